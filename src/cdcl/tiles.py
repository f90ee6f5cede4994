"""``cdcl tiles``: tissue tiles cut from whole-slide images, as unlabeled training data.

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

import argparse
import logging
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cdcl.errors import CdclError
from cdcl.io import collect_inputs, ensure_writable_dir
from cdcl.slide import (
    PLAUSIBLE_MPP, RESIDUAL_TOLERANCE, SLIDE_SUFFIXES, THUMB_SIDE, Grid, SlideReader, choose_level, for_each_slide, open_slides,
    tissue_mask, tissue_tiles,
)
from cdcl.viz import save_png

log = logging.getLogger(__name__)


def sample_cores(reader: SlideReader, grid: Grid, count: int, min_tissue: float, seed: int) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` full grid cells with at least ``min_tissue`` of their area in the tissue mask, drawn
    without replacement by a generator seeded with ``seed`` and the slide's file name, in reading order."""
    cells = tissue_tiles(grid, tissue_mask(reader.thumbnail(THUMB_SIDE), reader.name), reader.dimensions[0], min_tissue)
    full = [core for _, core in cells if core[2] - core[0] == core[3] - core[1] == grid.tile]
    rng = np.random.default_rng([seed, zlib.crc32(Path(reader.name).name.encode())])
    return [full[i] for i in sorted(rng.permutation(len(full))[:count])]


def cut_tiles(reader: SlideReader, out_dir: Path, *, size: int = 256, per_slide: int = 100, tile_mpp: float | None = None,
              min_tissue: float = 0.5, seed: int = 0) -> tuple[int, int]:
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


def run(args: argparse.Namespace) -> int:
    if args.size < 32 or args.per_slide < 1 or not 0 <= args.min_tissue <= 1 or args.seed < 0:
        raise CdclError("--size must be at least 32 px, --per-slide at least 1, --min-tissue within [0, 1] and --seed 0 or more")
    if args.tile_mpp is not None and not PLAUSIBLE_MPP[0] <= args.tile_mpp <= PLAUSIBLE_MPP[1]:
        raise CdclError(f"--tile-mpp must be between {PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]} microns per pixel, got {args.tile_mpp}")
    paths = collect_inputs(args.slides, SLIDE_SUFFIXES, "slides")
    readers = open_slides(paths, args.mpp, args.tile_mpp)
    resolutions = sorted({reader.mpp for reader in readers if reader.mpp is not None})
    if args.tile_mpp is None and resolutions and resolutions[-1] > resolutions[0] * (1 + RESIDUAL_TOLERANCE):
        log.warning("the slides' level 0 ranges from %.3g to %.3g um/px: without --tile-mpp their tiles differ in "
                    "resolution as much", resolutions[0], resolutions[-1])
    out_dir = ensure_writable_dir(args.out)
    sampled = []

    def cut_one(reader: SlideReader) -> None:
        count, written = cut_tiles(reader, out_dir, size=args.size, per_slide=args.per_slide, tile_mpp=args.tile_mpp,
                                   min_tissue=args.min_tissue, seed=args.seed)
        if count < args.per_slide:
            log.warning("%s: only %d tiles of %d px are at least %.0f%% tissue", reader.name, count, args.size, 100 * args.min_tissue)
        log.info("%s: %d tiles (%d written now, %d already there)", reader.name, count, written, count - written)
        sampled.append(count)

    for_each_slide(readers, cut_one)
    if not sum(sampled):
        raise CdclError(f"no tile of {args.size} px is at least {100 * args.min_tissue:.0f}% tissue in any slide; "
                        "lower --size or --min-tissue", paths[0] if len(paths) == 1 else None)
    log.info("%d tiles from %d slide(s) -> %s", sum(sampled), len(paths), out_dir)
    return 0
