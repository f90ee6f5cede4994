"""``cdcl evaluate``: metrics of a checkpoint on whole labeled images (see ``cdcl.inference.evaluation``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cdcl.data import load_dataset
from cdcl.data.splits import read_split_file
from cdcl.errors import CdclError
from cdcl.inference.evaluation import SUMMARY_KEYS, evaluate_items, format_table
from cdcl.inference.predictor import load_predictor
from cdcl.inference.resolution import check_request


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args.checkpoint, args.device, args.batch_size, tta=args.tta)
    check_request(predictor, args.mpp, args.checkpoint)
    dataset = load_dataset(args.data, args.format)
    names = read_split_file(args.split, dataset) if args.split else [it.name for it in dataset if it.has_mask]
    if not names:
        raise CdclError("no annotated images to evaluate (data without masks)", args.split or args.data)
    result = evaluate_items(predictor, dataset.subset(names), args.out, overlays=not args.no_overlays, mpp=args.mpp)
    print(format_table({Path(args.checkpoint).name: result}), end="")
    print("pooled: " + ", ".join(f"{k} {result['pooled'][k]:.3f}" for k in SUMMARY_KEYS if k in result["pooled"]))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0
