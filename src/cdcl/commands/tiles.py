"""``cdcl tiles``: tissue tiles cut from whole-slide images, as unlabeled training data (``cdcl.wsi.sampling``)."""

from __future__ import annotations

import argparse
import logging

from cdcl.errors import CdclError
from cdcl.io import collect_inputs, ensure_writable_dir
from cdcl.wsi.batch import for_each_slide, open_slides
from cdcl.wsi.readers import RESIDUAL_TOLERANCE, SLIDE_SUFFIXES, SlideReader
from cdcl.wsi.sampling import cut_tiles

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    paths = collect_inputs(args.slides, SLIDE_SUFFIXES, "slides")
    readers = open_slides(paths, args.mpp, args.tile_mpp)
    resolutions = sorted({reader.mpp for reader in readers if reader.mpp is not None})
    if args.tile_mpp is None and resolutions and resolutions[-1] > resolutions[0] * (1 + RESIDUAL_TOLERANCE):
        log.warning(
            "the slides' level 0 ranges from %.3g to %.3g um/px: without --tile-mpp their tiles differ in "
            "resolution as much",
            resolutions[0],
            resolutions[-1],
        )
    out_dir = ensure_writable_dir(args.out)
    sampled = []

    def cut_one(reader: SlideReader) -> None:
        count, written = cut_tiles(
            reader,
            out_dir,
            size=args.size,
            per_slide=args.per_slide,
            tile_mpp=args.tile_mpp,
            min_tissue=args.min_tissue,
            seed=args.seed,
        )
        if count < args.per_slide:
            log.warning(
                "%s: only %d tiles of %d px are at least %.0f%% tissue",
                reader.name,
                count,
                args.size,
                100 * args.min_tissue,
            )
        log.info("%s: %d tiles (%d written now, %d already there)", reader.name, count, written, count - written)
        sampled.append(count)

    for_each_slide(readers, cut_one)
    if not sum(sampled):
        raise CdclError(
            f"no tile of {args.size} px is at least {100 * args.min_tissue:.0f}% tissue in any slide; "
            "lower --size or --min-tissue",
            paths[0] if len(paths) == 1 else None,
        )
    log.info("%d tiles from %d slide(s) -> %s", sum(sampled), len(paths), out_dir)
    return 0
