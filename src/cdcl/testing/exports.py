"""The nucleus exports as they were first written, per nucleus with scikit-image: the references that the fast
``cdcl.instances.export`` is checked against (tests) and timed against (``benchmarks/export_speed.py``)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours, regionprops_table

from cdcl.instances.export import NUCLEUS_COLUMNS


def reference_polygons(labels: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0) -> list:
    """The per-nucleus definition of ``nuclei_polygons``: find_contours on each nucleus' zero-padded crop, the
    longest contour, collinear vertices dropped, pixel centres at +0.5, rounded to 3 decimals."""
    result = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        mask = np.zeros((box[0].stop - box[0].start + 2, box[1].stop - box[1].start + 2), np.float32)
        mask[1:-1, 1:-1] = labels[box] == index + 1
        ring = max(find_contours(mask, 0.5, fully_connected="high"), key=len)
        after = np.diff(ring, axis=0)
        before = np.concatenate([after[-1:], after[:-1]])
        points = ring[:-1][before[:, 0] * after[:, 1] != before[:, 1] * after[:, 0]]
        ring = np.concatenate([points, points[:1]])
        rows = ring[:, 0] + box[0].start - 1 + 0.5
        cols = ring[:, 1] + box[1].start - 1 + 0.5
        coords = np.stack([cols * scale + offset[0], rows * scale + offset[1]], axis=1)
        result.append((index + 1, np.round(coords, 3).tolist()))
    return result


def reference_table(
    labels: np.ndarray, image: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0
) -> list:
    """``nuclei_table`` as it was: moments summed per pixel, the perimeter from ``regionprops_table``."""
    rr, cc = np.nonzero(labels)
    counts = np.bincount(labels[rr, cc])
    ids = np.flatnonzero(counts)
    if not len(ids):
        return []

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(labels[rr, cc], values.astype(np.float64), minlength=len(counts))[ids] / counts[ids]

    rows, cols = mean(rr), mean(cc)
    var_r, var_c, cov = mean(rr * rr) - rows**2, mean(cc * cc) - cols**2, mean(rr * cc) - rows * cols
    spread = np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    major, minor = (var_r + var_c) / 2 + spread, (var_r + var_c) / 2 - spread
    eccentricity = np.sqrt(np.clip(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0), 0, 1))
    rgb = [mean(image[rr, cc, k]) for k in range(3)]
    columns = {
        "centroid_x": (cols + 0.5) * scale + offset[0],
        "centroid_y": (rows + 0.5) * scale + offset[1],
        "area": counts[ids] * scale**2,
        "perimeter": regionprops_table(labels, properties=("label", "perimeter"))["perimeter"] * scale,
        "eccentricity": eccentricity,
        "mean_intensity": 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2],
        "mean_r": rgb[0],
        "mean_g": rgb[1],
        "mean_b": rgb[2],
    }
    values = [ids.tolist()] + [np.round(columns[k], 3).tolist() for k in NUCLEUS_COLUMNS[1:]]
    return [dict(zip(NUCLEUS_COLUMNS, row)) for row in zip(*values)]
