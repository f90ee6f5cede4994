"""Tissue tiles cut from whole-slide images, as unlabeled training data (``cdcl tiles``).

A lab's unannotated slides become the unlabeled half of semi-supervised training: this writes a seeded sample of
``size`` x ``size`` px tissue tiles from each slide, as PNGs, into a folder that the ``folder`` data format reads
(images without a mask are unlabeled). Tiles are cut at the resolution of the annotated tiles (``tile_mpp``),
from the pyramid level that needs no upsampling, as ``predict-wsi`` reads them.

Names are ``<slide>_x<X>_y<Y>_<size>px[_<mpp>um].png``: the tile's top-left corner in level-0 pixels (to find it
in the slide again), its size and, when asked for, its resolution. The sample depends only on the seed, the
slide's name and its thumbnail, and tiles already written are kept: re-running an interrupted command completes
it, and a run with another size or resolution writes other files instead of counting those of the first.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cdcl.io import save_png
from cdcl.wsi.grid import Grid, tissue_tiles
from cdcl.wsi.readers import THUMB_SIDE, SlideReader, choose_level, tissue_mask


def sample_cores(
    reader: SlideReader, grid: Grid, count: int, min_tissue: float, seed: int
) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` full grid cells with at least ``min_tissue`` of their area in the tissue mask, drawn
    without replacement by a generator seeded with ``seed`` and the slide's file name, in reading order."""
    cells = tissue_tiles(grid, tissue_mask(reader.thumbnail(THUMB_SIDE), reader.name), reader.dimensions[0], min_tissue)
    full = [core for _, core in cells if core[2] - core[0] == core[3] - core[1] == grid.tile]
    rng = np.random.default_rng([seed, zlib.crc32(Path(reader.name).name.encode())])
    return [full[i] for i in sorted(rng.permutation(len(full))[:count])]


def cut_tiles(
    reader: SlideReader,
    out_dir: Path,
    *,
    size: int = 256,
    per_slide: int = 100,
    tile_mpp: float | None = None,
    min_tissue: float = 0.5,
    seed: int = 0,
) -> tuple[int, int]:
    """Write the slide's sampled tiles into ``out_dir``; returns (tiles sampled, tiles written now)."""
    grid = Grid.for_slide(reader, *choose_level(reader, tile_mpp), size, 0)
    cores = sample_cores(reader, grid, per_slide, min_tissue, seed)
    stem, settings = Path(reader.name).stem, f"{size}px" + ("" if tile_mpp is None else f"_{tile_mpp:g}um")
    written = 0
    for core in tqdm(cores, desc=stem, unit="tile", disable=None, leave=False):
        path = out_dir / f"{stem}_x{round(core[0] * grid.scale)}_y{round(core[1] * grid.scale)}_{settings}.png"
        if not path.exists():
            save_png(path, grid.read(reader, core))
            written += 1
    return len(cores), written
