"""One slide of a ``cdcl predict-wsi`` run as a self-contained job: predicted here, or sent to a Dask worker.

A job names its files, not loaded objects, so it pickles small; a worker loads the checkpoint once and keeps it
for its next jobs (:func:`predict_on_worker`). Whoever runs it, a slide's outputs depend only on the job: the
same files come out of a plain run, a shard and a cluster.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor, load_predictor
from cdcl.wsi.cohort import clear_failure
from cdcl.wsi.pipeline import default_workers, predict_slide
from cdcl.wsi.readers import SlideReader, open_slide

log = logging.getLogger(__name__)


def file_key(path: str | Path) -> dict[str, Any] | None:
    """Identity of an input file for the resume check: path, size and modification time (None: no such file;
    its reader reports that)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def checkpoint_key(path: str | Path) -> dict[str, Any] | None:
    """:func:`file_key` plus the SHA-256 of the contents: the cohort table says which weights made each slide."""
    key = file_key(path)
    if key is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return {**key, "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class SlideJob:
    """Everything needed to predict one slide (the command line's choices), picklable for a Dask worker."""

    slide: Path
    out_dir: Path
    checkpoint: Path
    checkpoint_key: dict[str, Any]  # checkpoint_key() when the command loaded and checked it
    device: str
    batch_size: int | None
    tta: str  # --tta, or the checkpoint's infer.tta
    mpp: float | None  # --mpp: level 0's microns per pixel, for every slide
    tile: int
    halo: int
    workers: int | None


def run_job(job: SlideJob, predictor: Predictor, reader: SlideReader) -> dict[str, Any]:
    """Predict ``job``'s slide (opened as ``reader``) with ``predictor``; returns its summary."""
    run_key = {
        "slide": file_key(job.slide),
        "checkpoint": job.checkpoint_key,
        "mpp": reader.mpp,
        "device": predictor.device.type,
        "amp": predictor.amp,
        "tta": predictor.tta,
    }  # a resumed run must not mix GPU and CPU tiles, nor augmented and plain ones
    stem = job.slide.stem
    summary = predict_slide(
        predictor,
        reader,
        job.out_dir,
        stem=stem,
        tile=job.tile,
        halo=job.halo,
        workers=job.workers,
        run_key=run_key,
    )
    clear_failure(job.out_dir, stem)  # of an earlier run
    return summary


def report(summary: dict[str, Any], out_dir: Path) -> None:
    """The log line of a slide predicted now (none for one skipped as already done)."""
    if not summary.get("skipped"):
        log.info(
            "%s: %d nuclei in %d tiles, %.1f s (%s megapixels/s) -> %s",
            Path(summary["slide"]).name,
            summary["nuclei"],
            summary["tiles"]["tissue"],
            summary["seconds"],
            summary["megapixels_per_s"],
            out_dir,
        )


@functools.lru_cache(maxsize=1)
def _worker_predictor(checkpoint: Path, sha256: str, device: str, batch_size: int | None, tta: str) -> Predictor:
    """The predictor of a worker process, loaded by its first job and kept for the next (same checkpoint)."""
    return load_predictor(checkpoint, device=device, batch_size=batch_size, tta=tta)


def predict_on_worker(job: SlideJob) -> dict[str, Any]:
    """A Dask task: ``job`` run with this worker's predictor. The checkpoint must still be the file the command
    checked (a training run may have overwritten it since)."""
    key = file_key(job.checkpoint)
    if key is None or any(key[name] != job.checkpoint_key[name] for name in key):
        raise CdclError("the checkpoint changed since the command started; run again", job.checkpoint)
    predictor = _worker_predictor(job.checkpoint, job.checkpoint_key["sha256"], job.device, job.batch_size, job.tta)
    workers = default_workers(predictor.device) if job.workers is None else job.workers
    if workers and multiprocessing.current_process().daemon:
        raise CdclError(
            f"this Dask worker cannot start the {workers} post-processing processes of --workers (a daemon process "
            "has no children): start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False, or pass --workers 0"
        )
    reader = open_slide(job.slide, job.mpp, need_mpp=predictor.mpp is not None)
    return run_job(job, predictor, reader)
