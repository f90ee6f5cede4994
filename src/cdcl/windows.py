"""Where windows start along one side of an image: the one computation behind the sliding windows of inference
(overlapping, blended) and the training tiles of a split (abutting). Slide grids (``cdcl.wsi.grid``) differ on
purpose: their cells never overlap, the last one is cut short instead, because each nucleus must belong to
exactly one cell."""

from __future__ import annotations


def window_starts(length: int, window: int, overlap: float = 0.0) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``window`` overlapping by ``overlap``; the last
    window ends exactly at ``length`` (``length >= window``), so it may overlap its neighbour more."""
    stride = max(1, int(window * (1 - overlap)))
    return sorted({*range(0, length - window, stride), length - window})
