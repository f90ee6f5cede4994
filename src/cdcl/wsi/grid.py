"""The tile grid of a slide at the working resolution, and which of its cells hold tissue.

Cells tile the slide without overlap (the last one in a row or column is cut short at the border): the seam
rule of ``cdcl.wsi.pipeline`` keeps each nucleus in the one cell holding its centroid, so cells must not
overlap, unlike the sliding windows of ``cdcl.windows`` that are blended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from cdcl.wsi.readers import SlideReader


@dataclass(frozen=True)
class Grid:
    """Tiles at the working resolution (the chosen level resized by ``residual``)."""

    level: int
    residual: float  # level pixels per working pixel
    scale: float  # level-0 pixels per working pixel
    width: int
    height: int
    level_size: tuple[int, int]
    tile: int
    halo: int

    @classmethod
    def for_slide(cls, reader: SlideReader, level: int, residual: float, tile: int, halo: int) -> Grid:
        level_w, level_h = reader.level_dimensions[level]
        return cls(
            level,
            residual,
            reader.level_downsamples[level] * residual,
            int(level_w / residual),
            int(level_h / residual),
            (level_w, level_h),
            tile,
            halo,
        )

    def cores(self) -> list[tuple[int, int, int, int]]:
        """``(x0, y0, x1, y1)`` of every grid cell, row-major; the list index is the tile's id."""
        return [
            (x, y, min(x + self.tile, self.width), min(y + self.tile, self.height))
            for y in range(0, self.height, self.tile)
            for x in range(0, self.width, self.tile)
        ]

    def box(self, core: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """The core grown by the halo, clipped to the slide."""
        x0, y0, x1, y1 = core
        h = self.halo
        return max(x0 - h, 0), max(y0 - h, 0), min(x1 + h, self.width), min(y1 + h, self.height)

    def read(self, reader: SlideReader, box: tuple[int, int, int, int]) -> np.ndarray:
        """The box's pixels at the working resolution."""
        x0, y0, x1, y1 = box
        r = self.residual
        lx0, ly0 = round(x0 * r), round(y0 * r)
        lx1, ly1 = min(round(x1 * r), self.level_size[0]), min(round(y1 * r), self.level_size[1])
        region = reader.read_region(self.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        if r == 1.0:
            return region
        return np.array(Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))  # writable


def tissue_tiles(
    grid: Grid, mask: np.ndarray, level0_width: int, min_fraction: float = 0.0
) -> list[tuple[int, tuple[int, int, int, int]]]:
    """``(id, core)`` of the grid cells that touch the tissue mask, and have at least ``min_fraction`` of their
    area in it."""
    to_mask = mask.shape[1] / level0_width * grid.scale  # mask pixels per working pixel
    tiles = []
    for index, core in enumerate(grid.cores()):
        x0, y0, x1, y1 = core
        cell = mask[int(y0 * to_mask) : int(np.ceil(y1 * to_mask)), int(x0 * to_mask) : int(np.ceil(x1 * to_mask))]
        if cell.any() and cell.mean() >= min_fraction:
            tiles.append((index, core))
    return tiles
