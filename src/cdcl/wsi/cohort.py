"""The cohort table: one row per slide of an output folder (``cohort.csv``) and a histogram of nuclei per mm².

Read from what the runs leave: ``<stem>_summary.json`` (finished), the lock a run holds (running),
``<stem>_failed.json`` written when a slide of a batch fails, or a journal nobody works on (failed: interrupted),
and the slide list of the command (missing: none of these). Any number of runs, shards or Dask workers may be
writing the folder meanwhile; the table is a snapshot and is replaced atomically.
"""

from __future__ import annotations

import csv
import fcntl
import io
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cdcl.io import write_json_atomic, write_text_atomic
from cdcl.viz import plot_histogram
from cdcl.vocab import CohortStatus
from cdcl.wsi.journal import lock_path, read_record

TABLE = "cohort.csv"
HISTOGRAM = "cohort_nuclei_per_mm2.png"
COLUMNS = (
    "slide",
    "status",
    "nuclei",
    "tissue_mm2",
    "nuclei_per_mm2",
    "mean_nucleus_area_um2",
    "seconds",
    "device",
    "checkpoint_sha256",
    "error",
)
INTERRUPTED = "interrupted (killed, or a damaged tile); re-run the command to resume it"


def failure_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}_failed.json"


def record_failure(out_dir: Path, stem: str, error: str) -> None:
    """Leave the one-line error of a slide that failed while the rest of its batch went on."""
    write_json_atomic(failure_path(out_dir, stem), {"slide": stem, "error": error, "time": time.time()})


def clear_failure(out_dir: Path, stem: str) -> None:
    failure_path(out_dir, stem).unlink(missing_ok=True)


def is_running(lock: Path) -> bool:
    """Whether a run holds ``lock`` (``cdcl.wsi.pipeline.only_run``). Tried with a shared lock for an instant,
    which a run starting meanwhile waits out."""
    try:
        fh = open(lock)
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _stems(out_dir: Path, expected: Iterable[str]) -> list[str]:
    """Slides of the table: the ``expected`` ones and every one the folder holds a trace of."""
    found = set(expected)
    found.update(p.name.removesuffix("_summary.json") for p in out_dir.glob("*_summary.json"))
    found.update(p.name.removesuffix("_failed.json") for p in out_dir.glob("*_failed.json"))
    found.update(p.name.removesuffix(".partial") for p in out_dir.glob("*.partial") if p.is_dir())
    found.update(p.name[1:].removesuffix(".lock") for p in out_dir.glob(".*.lock"))
    return sorted(found)


def _finished_row(summary: dict[str, Any]) -> dict[str, Any]:
    settings = summary.get("settings") or {}
    area = summary.get("tissue_mm2")
    return {
        "status": "finished",
        "nuclei": summary["nuclei"],
        "tissue_mm2": area,
        "nuclei_per_mm2": round(summary["nuclei"] / area, 1) if area else None,
        "mean_nucleus_area_um2": summary.get("mean_nucleus_area_um2"),
        "seconds": summary.get("seconds"),
        "device": settings.get("device"),
        "checkpoint_sha256": (settings.get("checkpoint") or {}).get("sha256"),
    }


def slide_row(out_dir: Path, stem: str) -> dict[str, Any]:
    """The table row of ``stem`` (columns not known for its status are None)."""
    summary = read_record(out_dir / f"{stem}_summary.json")
    failure = read_record(failure_path(out_dir, stem))
    status: CohortStatus
    row: dict[str, Any] = {}
    if is_running(lock_path(out_dir, stem)):
        status = "running"
    elif summary is not None and isinstance(summary.get("nuclei"), int):
        row = _finished_row(summary)
        status = "finished"
    elif failure is not None:
        status, row = "failed", {"error": failure.get("error")}
    elif (out_dir / f"{stem}.partial").is_dir() or lock_path(out_dir, stem).exists():
        status, row = "failed", {"error": INTERRUPTED}
    else:
        status = "missing"
    return {**dict.fromkeys(COLUMNS), **row, "slide": stem, "status": status}


def cohort_rows(out_dir: Path, expected: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One row per slide (sorted by name): the ``expected`` stems, and all the folder knows of."""
    return [slide_row(out_dir, stem) for stem in _stems(out_dir, expected)]


def write_cohort(out_dir: Path, expected: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``cohort.csv`` and the histogram of nuclei per mm² of the finished slides into ``out_dir``; returns the
    rows."""
    rows = cohort_rows(out_dir, expected)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_text_atomic(out_dir / TABLE, text.getvalue())
    values = [row["nuclei_per_mm2"] for row in rows if row["nuclei_per_mm2"] is not None]
    plot_histogram(values, out_dir / HISTOGRAM, "nuclei per mm² of tissue", f"{len(values)} finished slides")
    return rows
