"""Nucleus size of instance maps: the statistic that ties an image's scale to the one a model was trained at.

The size is read from the foreground alone (every pixel of every nucleus): each foreground pixel's distance to
the background, averaged, less half a pixel (a rim pixel's centre lies half a pixel inside the outline), times
six: for a disc that is its diameter, as a disc's mean distance to its rim is a third of its radius. It scales
linearly with the image, so rescaling an image by ``s`` multiplies it by ``s`` (``cdcl.inference.resolution``
reads an image's scale from it). Unlike a per-instance measure it does not depend on how the foreground is cut
into instances: a model run at the wrong scale splits large nuclei into fragments, which would make them look
small, but their foreground keeps its width.
"""

from __future__ import annotations

from collections.abc import Iterable

import edt
import numpy as np

MIN_NUCLEI = 5  # fewer nuclei give no size: so few say little about a scale
RIM = 0.5  # px: a foreground pixel's distance transform counts to the centre of the nearest background pixel
DISC = 6.0  # a disc's diameter over the mean distance of its points to its rim


def nucleus_diameter(label_maps: Iterable[np.ndarray]) -> float | None:
    """The typical nucleus diameter (px) of instance maps (0 = background), pooled over every foreground pixel
    of every map; None with fewer than ``MIN_NUCLEI`` nuclei in all."""
    total, pixels, nuclei = 0.0, 0, 0
    for labels in label_maps:
        foreground = labels > 0
        if not foreground.any() or foreground.all():  # no nucleus, or no background to measure from
            continue
        distance = edt.edt(np.ascontiguousarray(foreground, dtype=np.uint8), black_border=False, parallel=1)
        total += float(distance[foreground].sum()) - RIM * int(foreground.sum())
        pixels += int(foreground.sum())
        nuclei += len(np.unique(labels[foreground]))
    return DISC * total / pixels if nuclei >= MIN_NUCLEI else None
