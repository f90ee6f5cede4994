"""``--dask``: the slides of a run as Dask tasks, one per slide, on an existing cluster or a local one.

Nothing here is a scheduler of its own: Dask places the tasks, honours worker resources (``--resources GPU=1``)
and re-runs the task of a worker that died on another one (up to ``distributed.scheduler.allowed-failures``
times). Such a re-run is safe because of the pipeline's own guards: the dead worker's lock on the slide went
with its process, the re-run resumes the slide's journal, and a slide whose outputs are complete is skipped,
so no slide is written twice. ``distributed`` is an optional extra (``pip install 'cdcl[cluster]'``). Neither
it nor torch is imported until a run uses them: the CLI checks ``--dask`` and ``--resources`` with the parsers
below before anything loads.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cdcl.errors import CdclError, squashed

if TYPE_CHECKING:
    from cdcl.wsi.job import SlideJob

log = logging.getLogger(__name__)

LOCAL = "local:"
CONNECT_LIMIT_S = 30.0  # at most this long for a scheduler to answer (less if Dask's connect timeout is shorter)
ADDRESS = re.compile(r"^([a-z]+://)?[^\s:/]+:\d+$")
DASK_USAGE = "--dask must be a scheduler address (tcp://host:8786) or local:N with N >= 1 worker processes"


def parse_dask(text: str) -> str:
    """An argparse ``type=`` for ``--dask``: ``local:N`` (N >= 1) or ``[scheme://]host:port``."""
    if text.startswith(LOCAL):
        count = text[len(LOCAL) :]
        if not (count.isdigit() and int(count) >= 1):
            raise CdclError(f"{DASK_USAGE}, got '{text}'")
    elif not ADDRESS.match(text):
        raise CdclError(f"{DASK_USAGE}, got '{text}'")
    return text


def parse_resources(text: str) -> dict[str, float]:
    """An argparse ``type=`` for ``--resources``: ``NAME=AMOUNT[,NAME=AMOUNT...]`` (Dask worker resources that
    each slide's task needs, e.g. ``GPU=1``)."""
    resources = {}
    for item in text.split(","):
        name, _, amount = (part.strip() for part in item.partition("="))
        try:
            resources[name] = float(amount)
        except ValueError:
            resources[name] = 0.0
        if not name or not resources[name] > 0:
            raise CdclError(f"--resources must be NAME=AMOUNT[,...] with amounts > 0 (e.g. GPU=1), got '{text}'")
    return resources


def _distributed() -> Any:
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise CdclError("--dask needs the optional 'distributed' package: pip install 'cdcl[cluster]'") from None


@contextlib.contextmanager
def dask_client(spec: str, resources: dict[str, float] | None) -> Iterator[Any]:
    """A ``distributed.Client`` of the scheduler at ``spec``, or of a ``LocalCluster`` of N single-threaded worker
    processes (``local:N``, each offering ``resources``). An address that does not answer is a CdclError within
    :data:`CONNECT_LIMIT_S`."""
    distributed = _distributed()
    import dask

    if spec.startswith(LOCAL):
        # not daemonic: a worker may start the pipeline's own reader and post-processing processes (--workers)
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = distributed.LocalCluster(
                n_workers=int(spec[len(LOCAL) :]),
                threads_per_worker=1,
                processes=True,
                resources=resources,
                dashboard_address=None,
            )
        with cluster, distributed.Client(cluster) as client:
            yield client
        return
    timeout = min(CONNECT_LIMIT_S, dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect")))
    try:
        client = distributed.Client(spec, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CdclError(f"no Dask scheduler answers at {spec} within {timeout:g} s ({squashed(exc, 160)})") from None
    with client:
        yield client


def predict_on_cluster(client: Any, jobs: Sequence[SlideJob], resources: dict[str, float] | None) -> dict[str, str]:
    """Run ``jobs`` as one task each on ``client``'s cluster; returns the one-line error of each failed slide by
    name, as :func:`cdcl.wsi.batch.slide_failures` does for a local run (a single slide's error is raised)."""
    from cdcl.wsi.job import predict_on_worker, report

    distributed = _distributed()
    run = uuid.uuid4().hex[:8]  # task keys of two commands sharing a cluster must differ
    futures = {
        client.submit(predict_on_worker, job, key=f"cdcl-predict-wsi-{run}-{job.slide.name}", resources=resources): job
        for job in jobs
    }
    failures = {}
    for future in distributed.as_completed(futures):
        job = futures[future]
        try:
            report(future.result(), job.out_dir)
        except CdclError as err:
            error = str(err)
        except distributed.KilledWorker:
            error = f"{job.slide}: the Dask workers predicting it died every time (out of memory?)"
        else:
            continue
        if len(jobs) == 1:
            raise CdclError(error)
        log.error("%s (going on with the other slides)", error)
        failures[str(job.slide)] = error
    return failures
