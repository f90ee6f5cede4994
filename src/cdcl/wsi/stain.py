"""A slide's own stain, estimated once from a sample of its tissue tiles (``predict-wsi`` with stain normalisation).

One estimate per slide, not per tile: a tile with little tissue gives an unstable estimate, and tiles normalised
each their own way would meet at seams in different colours. The sample is a centred crop of evenly spaced tissue
tiles, the same for every run of the slide, so a resumed run normalises as the interrupted one did.
"""

from __future__ import annotations

import logging

import numpy as np

from cdcl.data.stain import StainNormalizer
from cdcl.wsi.grid import Grid
from cdcl.wsi.readers import SlideReader

log = logging.getLogger(__name__)

SAMPLE_TILES = 8  # tissue tiles the slide's stain is estimated from
SAMPLE_SIDE = 512  # side of the centred crop read from each, in working pixels


def sample_boxes(tiles: list[tuple[int, tuple[int, int, int, int]]], count: int, side: int) -> list[tuple[int, ...]]:
    """Centred ``side`` x ``side`` crops (cut to the core) of up to ``count`` evenly spaced ``(id, core)`` tiles."""
    picks = np.unique(np.linspace(0, len(tiles) - 1, min(count, len(tiles))).round().astype(int)) if tiles else []
    boxes = []
    for i in picks:
        x0, y0, x1, y1 = tiles[i][1]
        cx, cy, half = (x0 + x1) // 2, (y0 + y1) // 2, side // 2
        boxes.append((max(x0, cx - half), max(y0, cy - half), min(x1, cx + half), min(y1, cy + half)))
    return boxes


def slide_stain(
    stain: StainNormalizer, reader: SlideReader, grid: Grid, tiles: list[tuple[int, tuple[int, int, int, int]]]
) -> StainNormalizer | None:
    """``stain`` with the slide's own stain fixed as its source; None (the slide is left as it is, with a warning)
    when its tissue sample holds no stain profile."""
    crops = [grid.read(reader, box) for box in sample_boxes(tiles, SAMPLE_TILES, SAMPLE_SIDE)]
    fixed = stain.with_source(crops)
    if fixed is None:
        log.warning(
            "%s: too little stained tissue to estimate its stain; predicting without normalisation", reader.name
        )
    return fixed
