"""``cdcl export CKPT OUT [--half]``: the prediction-only model file from a ``best.pt`` or ``last.pt``.

A training checkpoint carries the optimizer state and both student and teacher; prediction needs one set of
weights, the config, the tuned thresholds and the resolution. The file written here loads everywhere a
checkpoint does (``cdcl predict``, ``evaluate``, ``predict-wsi``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cdcl.checkpoint import lean_payload, load_checkpoint, save_checkpoint
from cdcl.errors import CdclError
from cdcl.inference.predictor import model_from_checkpoint

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.checkpoint), Path(args.out)
    if target.resolve() == source.resolve():
        raise CdclError("output would overwrite the checkpoint it is exported from; choose another name", target)
    payload = load_checkpoint(source)
    try:
        lean = lean_payload(payload, half=args.half)
    except CdclError as err:
        raise CdclError(err.problem, source) from None
    model_from_checkpoint(lean, source)  # the exported weights rebuild their model, or a one-line error
    if target.is_dir():
        raise CdclError("is a folder; give the output file name", target)
    if not target.parent.is_dir():
        raise CdclError("folder not found", target.parent)
    save_checkpoint(target, {k: v for k, v in lean.items() if k != "format"})
    log.info("%s (%.1f MB) -> %s (%.1f MB)", source, source.stat().st_size / 1e6, target, target.stat().st_size / 1e6)
    return 0
