"""Nucleus size of instance maps: the statistic that ties an image's scale to the one a model was trained at.

A nucleus's size is its equivalent diameter (that of the disc with its area). Nuclei touching the image border
are left out, as they are cut short there (a tile of a larger image cuts many); an image whose every nucleus
touches the border keeps them all rather than having none. The median over a set of nuclei is robust to the
specks and merged clumps a prediction holds, and it scales linearly with the image: rescaling an image by ``s``
multiplies it by ``s`` (``cdcl.inference.resolution`` reads the scale of an image from it).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MIN_NUCLEI = 5  # fewer measured nuclei give no size: a median of 1-4 nuclei says little about a scale


def nucleus_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameters (px) of the nuclei of an HxW instance map (0 = background), border nuclei left out
    unless every nucleus touches the border."""
    areas = np.bincount(labels.ravel().astype(np.int64, copy=False))
    areas[0] = 0
    present = areas > 0
    inner = present.copy()
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).astype(np.int64)
    inner[border] = False
    keep = inner if inner.any() else present
    return 2.0 * np.sqrt(areas[keep] / np.pi)


def median_diameter(label_maps: Iterable[np.ndarray]) -> float | None:
    """Median equivalent diameter (px) over the nuclei of all ``label_maps``; None with fewer than
    ``MIN_NUCLEI`` nuclei."""
    sizes = [nucleus_diameters(labels) for labels in label_maps]
    pooled = np.concatenate(sizes) if sizes else np.zeros(0)
    return float(np.median(pooled)) if pooled.size >= MIN_NUCLEI else None
