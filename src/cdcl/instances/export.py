"""Nucleus exports shared by ``cdcl predict`` and ``cdcl predict-wsi``: measurements, polygons, files.

Coordinates follow the GeoJSON/QuPath convention: pixel (row r, column c) covers ``[c, c + 1) x [r, r + 1)``, so
its centre is ``(c + 0.5, r + 0.5)``. ``offset`` (x, y) and ``scale`` map the label map's pixels to level-0
pixels of a slide (``scale`` = level-0 pixels per label-map pixel); lengths and areas are in level-0 pixels too.
Writers stream their rows, so a slide's millions of nuclei never sit in memory at once, and every file is
written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cdcl.errors import CdclError
from cdcl.instances.outlines import label_outlines
from cdcl.io import atomic_path, save_png

NUCLEUS_COLUMNS = (
    "id",
    "centroid_x",
    "centroid_y",
    "area",
    "perimeter",
    "eccentricity",
    "mean_intensity",
    "mean_r",
    "mean_g",
    "mean_b",
)
NUCLEUS_COLOR = (220, 40, 40)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as Pillow's "L" conversion
_UUID_NAMESPACE = uuid.UUID("0b6f5b8e-3c3e-4f5a-9d0e-6c1d2c7a4e11")  # stable feature ids: same input, same file

Ring = list[list[float]]

# scikit-image's perimeter (neighborhood=4): weight of a border pixel by its code, 1 + 2 per 4-neighbour and 10 per
# diagonal neighbour that is a border pixel of the same region.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def _per_label(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``(ids, areas, mean)`` of the labels of foreground pixels; ``mean(values)`` averages a per-pixel value
    over each label with one ``bincount``."""
    counts = np.bincount(owner)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, values.astype(np.float64), minlength=len(counts))[ids] / counts[ids]

    return ids, counts[ids], mean


def label_centroids(labels: np.ndarray, origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, x, y)``: centroids in pixel coordinates of a frame where ``labels`` starts at integer ``origin``
    (x, y). Sums of integer coordinates are exact, so two overlapping crops of the same nucleus get the very
    same centroid (what the seam rule of ``cdcl.wsi.pipeline`` needs)."""
    rr, cc = np.nonzero(labels)
    ids, _, mean = _per_label(labels[rr, cc])
    return ids, mean(cc + origin[0]) + 0.5, mean(rr + origin[1]) + 0.5


def label_perimeters(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, perimeter)`` of the labels present (ascending): ``regionprops(labels)[i].perimeter`` (4-neighbourhood)
    for all of them with shifted comparisons instead of a per-region crop, erosion and convolution.

    A pixel is on its region's border unless its four neighbours all carry its label (outside the image and
    other labels count as background); each border pixel weighs by which of its eight neighbours are border
    pixels of the same region.
    """
    padded = np.pad(labels, 1)
    core = padded[1:-1, 1:-1]
    interior = (
        (padded[:-2, 1:-1] == core)
        & (padded[2:, 1:-1] == core)
        & (padded[1:-1, :-2] == core)
        & (padded[1:-1, 2:] == core)
    )
    border = np.zeros(padded.shape, bool)
    border[1:-1, 1:-1] = (core != 0) & ~interior
    flat, border = padded.ravel(), border.ravel()
    at = np.flatnonzero(border)
    owner = flat[at]
    code = np.ones(len(at), np.intp)
    width = padded.shape[1]
    for step, weight in ((1, 2), (width, 2), (width - 1, 10), (width + 1, 10)):
        for neighbour in (at - step, at + step):
            code += weight * ((flat[neighbour] == owner) & border[neighbour])
    ids = np.flatnonzero(np.bincount(owner))
    return ids, np.bincount(owner, _PERIMETER_WEIGHTS[code])[ids]


def _moments(labels: np.ndarray, ids: np.ndarray, area: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(row, col, var_row, var_col, cov)``: centroid and central second moments of the labels ``ids``
    (``area`` pixels each), summed over runs of one label along the rows (closed-form sums of consecutive
    integers) rather than over pixels: exact integers either way, so the very same floats, from ~20x fewer terms
    on MoNuSeg masks."""
    height, width = labels.shape
    padded = np.zeros((height, width + 1), labels.dtype)
    padded[:, :width] = labels  # a zero column ends each row's last run
    flat = padded.ravel()
    start = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
    n = np.diff(start, append=flat.size)
    owner = flat[start]
    start, n, owner = start[owner != 0], n[owner != 0], owner[owner != 0]
    r, c = np.divmod(start, width + 1)
    sum_c = n * c + n * (n - 1) // 2

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(owner, values.astype(np.float64))[ids] / area

    rows, cols = mean(r * n), mean(sum_c)
    sum_cc = n * c * c + c * n * (n - 1) + (n - 1) * n * (2 * n - 1) // 6
    return rows, cols, mean(r * r * n) - rows**2, mean(sum_cc) - cols**2, mean(r * sum_c) - rows * cols


def nuclei_table(
    labels: np.ndarray, image: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0
) -> list[dict[str, Any]]:
    """One row per nucleus (columns ``NUCLEUS_COLUMNS``): centroid in level-0 px, area (px²) and perimeter (px)
    in level-0 px, eccentricity, and the mean grey (``mean_intensity``) and RGB values of its pixels (0-255).

    Definitions are scikit-image's (``regionprops``), computed here for the whole label map at once (moments and
    means with one ``bincount`` each, the perimeter by :func:`label_perimeters`), which is many times faster than
    per-region properties on tiles with thousands of nuclei.
    """
    at = np.flatnonzero(labels)
    ids, area, mean = _per_label(labels.ravel()[at])
    if not len(ids):
        return []
    rows, cols, var_r, var_c, cov = _moments(labels, ids, area)
    spread = np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)  # inertia tensor eigenvalues: mid +- spread
    major, minor = (var_r + var_c) / 2 + spread, (var_r + var_c) / 2 - spread
    eccentricity = np.sqrt(np.clip(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0), 0, 1))
    pixels = np.take(image.reshape(-1, image.shape[-1]), at, axis=0)
    rgb = [mean(pixels[:, k]) for k in range(3)]
    _, perimeter = label_perimeters(labels)
    columns = {
        "centroid_x": (cols + 0.5) * scale + offset[0],
        "centroid_y": (rows + 0.5) * scale + offset[1],
        "area": area * scale**2,
        "perimeter": perimeter * scale,
        "eccentricity": eccentricity,
        "mean_intensity": sum(w * c for w, c in zip(_LUMA, rgb)),
        "mean_r": rgb[0],
        "mean_g": rgb[1],
        "mean_b": rgb[2],
    }
    values = [ids.tolist()] + [np.round(columns[k], 3).tolist() for k in NUCLEUS_COLUMNS[1:]]
    return [dict(zip(NUCLEUS_COLUMNS, row)) for row in zip(*values)]


def nuclei_polygons(
    labels: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0
) -> list[tuple[int, Ring]]:
    """``(id, ring)`` per nucleus (ascending id): its outer boundary as a closed ring of (x, y) level-0 coordinates.

    The ring is the 0.5 iso-line of the nucleus mask as ``skimage.measure.find_contours`` traces it on the
    zero-padded mask with ``fully_connected="high"`` (same start and direction), so a diagonal pixel bridge stays
    one ring; vertices that continue a straight edge are dropped (marching squares emits one per pixel edge,
    which would triple the file size for nothing). Holes are ignored and, if a label has several separate parts,
    only the longest outline is kept. All nuclei are traced at once with array operations, several times faster
    than find_contours, which assembles every boundary cell's segment as Python objects.
    """
    ids, rings, sizes = label_outlines(labels)
    rows, cols = rings[:, 0] - 0.5, rings[:, 1] - 0.5  # 1-padded frame -> pixel centres at +0.5
    coords = np.round(np.stack([cols * scale + offset[0], rows * scale + offset[1]], axis=1), 3).tolist()
    ends = np.cumsum(sizes).tolist()
    return [(nucleus_id, coords[end - size : end]) for nucleus_id, end, size in zip(ids.tolist(), ends, sizes.tolist())]


def nucleus_feature(
    ring: Ring, measurements: dict[str, Any], source: str, classification: str = "Nucleus"
) -> dict[str, Any]:
    """A QuPath detection Feature; its id is a UUID derived from ``source`` and the nucleus id (reproducible)."""
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{source}#{measurements['id']}")),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": classification, "color": list(NUCLEUS_COLOR)},
            "measurements": measurements,
        },
    }


@contextlib.contextmanager
def geojson_stream(path: str | Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield ``add(feature)``; the FeatureCollection (one feature per line) appears at ``path`` only complete."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        separator = ["\n"]

        def add(feature: dict[str, Any]) -> None:
            fh.write(separator[0] + json.dumps(feature, separators=(",", ":")))
            separator[0] = ",\n"

        yield add
        fh.write("\n]}\n")


@contextlib.contextmanager
def csv_stream(
    path: str | Path, columns: tuple[str, ...] = NUCLEUS_COLUMNS
) -> Iterator[Callable[[dict[str, Any]], Any]]:
    """Yield ``add(row)``; the CSV (header always, even without rows) appears at ``path`` only complete."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        yield writer.writerow


def write_geojson(
    path: str | Path,
    polygons: list[tuple[int, Ring]],
    measurements: list[dict[str, Any]],
    classification: str = "Nucleus",
) -> None:
    """QuPath-compatible GeoJSON of nuclei: each polygon with the measurement row of the same id."""
    rows = {row["id"]: row for row in measurements}
    with geojson_stream(path) as add:
        for nucleus_id, ring in polygons:
            add(nucleus_feature(ring, rows[nucleus_id], Path(path).stem, classification))


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: tuple[str, ...] = NUCLEUS_COLUMNS) -> None:
    """A CSV of rows with a header line."""
    with csv_stream(path, columns) as add:
        for row in rows:
            add(row)


def write_label_map(path: str | Path, labels: np.ndarray) -> None:
    """Instance labels as a 16-bit PNG (``.png``) or a 32-bit zlib TIFF (``.tif``/``.tiff``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if labels.size and labels.max() > np.iinfo(np.uint16).max:
            raise CdclError(
                f"{int(labels.max())} nuclei do not fit a 16-bit PNG; write the labels-tiff format instead", path
            )
        save_png(path, labels.astype(np.uint16))
    elif suffix in (".tif", ".tiff"):
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib")
    else:
        raise ValueError(f"label maps are written as .png or .tif, not {suffix!r}")
