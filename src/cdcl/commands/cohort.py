"""``cdcl cohort``: the cohort table of a ``predict-wsi`` output folder (``cdcl.wsi.cohort``), made again at any
time, e.g. while the jobs of an array still run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cdcl.errors import CdclError
from cdcl.io import collect_inputs
from cdcl.wsi.cohort import HISTOGRAM, TABLE, write_cohort
from cdcl.wsi.readers import SLIDE_SUFFIXES

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    if not out_dir.is_dir():
        raise CdclError("no such folder (the --out of cdcl predict-wsi)", out_dir)
    expected = [path.stem for path in collect_inputs(args.slides, SLIDE_SUFFIXES, "slides")] if args.slides else []
    rows = write_cohort(out_dir, expected)
    if not rows:
        log.warning("%s: no slide outputs and no slides given; the table is empty", out_dir)
    for row in rows:
        print(f"{row['slide']}\t{row['status']}\t{'' if row['nuclei'] is None else row['nuclei']}")
    log.info("%d slides -> %s, %s", len(rows), out_dir / TABLE, out_dir / HISTOGRAM)
    return 0
