"""``cdcl data check``, ``cdcl data show`` and ``cdcl split``: the dataset commands (work in ``cdcl.data``)."""

from __future__ import annotations

import argparse
import logging

import numpy as np

from cdcl.config import load_config
from cdcl.data import load_dataset
from cdcl.data.check import check_dataset, format_report
from cdcl.data.show import views_grid
from cdcl.data.splits import DEFAULT_TILE, make_split, parse_fraction, write_split
from cdcl.errors import CdclError
from cdcl.io import save_png, write_json_atomic

log = logging.getLogger(__name__)


def check(args: argparse.Namespace) -> int:
    """``cdcl data check``: exit 0 when no problem is found, 2 otherwise (last line: a one-line summary)."""
    report = check_dataset(args.data, args.format)
    if args.json:
        write_json_atomic(args.json, report)
    print(format_report(report))
    n_problems = len(report["problems"])
    if n_problems:
        print(f"{n_problems} problem{'s' if n_problems > 1 else ''} found in {report['root']}")
        return 2
    print(f"no problems found in {report['images']} images of {report['root']}")
    return 0


def show(args: argparse.Namespace) -> int:
    """``cdcl data show DATA --format F [--config FILE] [--set k=v] [--n N] [--seed S] --out PNG``."""
    if not str(args.out).lower().endswith(".png"):
        raise CdclError("output must be a .png file", args.out)
    cfg = load_config(args.config, args.set).augment
    dataset = load_dataset(args.data, args.format)
    if len(dataset) == 0:
        raise CdclError("no images found", args.data)
    picked = np.random.default_rng(args.seed).choice(len(dataset), size=min(args.n, len(dataset)), replace=False)
    items = [dataset[int(i)] for i in sorted(picked)]
    grid = views_grid([(item.image, item.instances) for item in items], cfg, args.seed)
    save_png(args.out, grid)
    log.info("wrote %s: %d rows (%s)", args.out, len(items), ", ".join(item.name for item in items))
    return 0


def split(args: argparse.Namespace) -> int:
    """``cdcl split``: write the four lists and split.json for one label budget."""
    dataset = load_dataset(args.data, args.format)
    tile = args.tile if args.tile is not None else DEFAULT_TILE.get(args.format)
    split = make_split(
        dataset,
        parse_fraction(args.labeled),
        args.seed,
        tile=tile or None,  # --tile 0: whole images
        val_fraction=args.val,
        test_fraction=args.test,
    )
    write_split(split, args.out)
    counts = ", ".join(f"{count} {name}" for name, count in split.counts().items())
    print(f"{counts} -> {args.out}")
    return 0
