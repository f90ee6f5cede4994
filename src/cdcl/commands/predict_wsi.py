"""``cdcl predict-wsi``: nuclei of whole-slide images, streamed with bounded memory (``cdcl.wsi.pipeline``).

A batch of slides is opened and checked before any is predicted; the run key (slide and checkpoint files,
resolution, device) lets a re-run skip the finished slides and resume the interrupted one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError
from cdcl.inference.predictor import load_predictor
from cdcl.io import collect_inputs, ensure_writable_dir
from cdcl.wsi.batch import for_each_slide, open_slides
from cdcl.wsi.pipeline import predict_slide
from cdcl.wsi.readers import SLIDE_SUFFIXES, SlideReader

log = logging.getLogger(__name__)


def _file_key(path: str | Path) -> dict[str, Any] | None:
    """Identity of an input file for the resume check: path, size and modification time (None: no such file;
    its reader reports that)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run(args: argparse.Namespace) -> int:
    paths = collect_inputs(args.slides, SLIDE_SUFFIXES, "slides")
    checkpoint = _file_key(args.checkpoint)  # the file loaded now, whatever becomes of it during a long batch
    predictor = load_predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, tta=args.tta)
    if _file_key(args.checkpoint) != checkpoint:
        raise CdclError(
            "the checkpoint changed while it was being loaded (a training run saving it?); run again", args.checkpoint
        )
    if predictor.mpp is None:
        log.info(
            "the checkpoint stores no training resolution: predicting at the slides' level 0%s",
            " (--mpp only reported)" if args.mpp is not None else "",
        )
    readers = open_slides(paths, args.mpp, predictor.mpp)
    slides = {reader.name: _file_key(reader.name) for reader in readers}
    out_dir = ensure_writable_dir(args.out)
    nuclei = []

    def predict_one(reader: SlideReader) -> None:
        run_key = {
            "slide": slides[reader.name],
            "checkpoint": checkpoint,
            "mpp": reader.mpp,
            "device": predictor.device.type,
            "amp": predictor.amp,
            "tta": predictor.tta,
        }  # a resumed run must not mix GPU and CPU tiles, nor augmented and plain ones
        summary = predict_slide(
            predictor,
            reader,
            out_dir,
            stem=Path(reader.name).stem,
            tile=args.tile,
            halo=args.halo,
            workers=args.workers,
            run_key=run_key,
        )
        nuclei.append(summary["nuclei"])
        if not summary.get("skipped"):
            log.info(
                "%d nuclei in %d tiles, %.1f s (%s megapixels/s) -> %s",
                summary["nuclei"],
                summary["tiles"]["tissue"],
                summary["seconds"],
                summary["megapixels_per_s"],
                out_dir,
            )

    for_each_slide(readers, predict_one)
    if len(readers) > 1:
        log.info("%d slides, %d nuclei -> %s", len(readers), sum(nuclei), out_dir)
    return 0
