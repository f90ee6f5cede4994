"""``cdcl predict-wsi``: nuclei of whole-slide images, streamed with bounded memory (``cdcl.wsi.pipeline``).

A batch of slides is opened and checked before any is predicted; the run key (slide and checkpoint files,
resolution, device) lets a re-run skip the finished slides and resume the interrupted one. ``--shard K/N``
keeps the K-th of N shares of the slides (``cdcl.wsi.shards``); ``--dask`` sends one task per slide to a Dask
cluster (``cdcl.wsi.cluster``). Every run ends by writing the cohort table of the output folder
(``cdcl.wsi.cohort``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections import Counter
from pathlib import Path

from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor, load_predictor
from cdcl.io import collect_inputs, ensure_writable_dir
from cdcl.vocab import COHORT_STATUSES
from cdcl.wsi.batch import open_slides, raise_failures, slide_failures
from cdcl.wsi.cohort import TABLE, record_failure, write_cohort
from cdcl.wsi.job import SlideJob, checkpoint_key, file_key, report, run_job
from cdcl.wsi.readers import SLIDE_SUFFIXES, SlideReader
from cdcl.wsi.shards import shard

log = logging.getLogger(__name__)


def _load_checked(args: argparse.Namespace) -> tuple[Predictor, dict]:
    """The predictor and the checkpoint's key. With ``--dask`` it is loaded on the CPU here only to check it
    before any task is sent (the workers load it on ``--device``)."""
    checkpoint = checkpoint_key(args.checkpoint)  # the file loaded now, whatever becomes of it during a long batch
    device = "cpu" if args.dask else args.device
    predictor = load_predictor(args.checkpoint, device=device, batch_size=args.batch_size, tta=args.tta)
    if file_key(args.checkpoint) != {k: v for k, v in (checkpoint or {}).items() if k != "sha256"}:
        raise CdclError(
            "the checkpoint changed while it was being loaded (a training run saving it?); run again", args.checkpoint
        )
    return predictor, checkpoint


def _client(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The Dask client of ``--dask`` (None without): connected, or its local cluster started, before anything is
    loaded, so a missing extra or a silent scheduler fails first."""
    if not args.dask:
        return contextlib.nullcontext()
    from cdcl.wsi.cluster import dask_client

    return dask_client(args.dask, args.resources)


def _run_here(predictor: Predictor, readers: list[SlideReader], jobs: dict[str, SlideJob]) -> dict[str, str]:
    def predict_one(reader: SlideReader) -> None:
        job = jobs[reader.name]
        report(run_job(job, predictor, reader), job.out_dir)

    return slide_failures(readers, predict_one)


def run(args: argparse.Namespace) -> int:
    paths = collect_inputs(args.slides, SLIDE_SUFFIXES, "slides")
    everyone = [path.stem for path in paths]  # the cohort table lists the slides of every shard
    if args.resources and not args.dask:
        raise CdclError("--resources is for the tasks of --dask; pass --dask too")
    if args.shard:
        paths = shard(paths, *args.shard)
        log.info("shard %d of %d: %d of %d slides", *args.shard, len(paths), len(everyone))
        if not paths:
            return 0
    with _client(args) as client:
        predictor, checkpoint = _load_checked(args)
        if predictor.mpp is None:
            log.info(
                "the checkpoint stores no training resolution: predicting at the slides' level 0%s",
                " (--mpp only reported)" if args.mpp is not None else "",
            )
        readers = open_slides(paths, args.mpp, predictor.mpp)
        out_dir = ensure_writable_dir(args.out)
        jobs = {
            reader.name: SlideJob(
                slide=Path(reader.name),
                out_dir=out_dir,
                checkpoint=Path(args.checkpoint).resolve(),
                checkpoint_key=checkpoint,
                device=args.device,
                batch_size=args.batch_size,
                tta=predictor.tta,
                mpp=args.mpp,
                tile=args.tile,
                halo=args.halo,
                workers=args.workers,
            )
            for reader in readers
        }
        if client is None:
            failures = _run_here(predictor, readers, jobs)
        else:
            from cdcl.wsi.cluster import predict_on_cluster

            failures = predict_on_cluster(client, list(jobs.values()), args.resources)
    for name, error in failures.items():
        record_failure(out_dir, Path(name).stem, error)
    rows = write_cohort(out_dir, everyone)
    counts = Counter(row["status"] for row in rows)
    log.info(
        "%d slides, %d nuclei (%s) -> %s",
        len(rows),
        sum(row["nuclei"] or 0 for row in rows),
        ", ".join(f"{counts[status]} {status}" for status in COHORT_STATUSES if counts[status]),
        out_dir / TABLE,
    )
    raise_failures(failures, len(readers))
    return 0
