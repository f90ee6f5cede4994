"""Nuclei of a whole-slide image, streamed tile by tile with bounded memory (``cdcl predict-wsi``).

Pipeline: choose the pyramid level matching the checkpoint's microns-per-pixel -> tissue mask on a thumbnail ->
tissue tiles read (with a halo) by DataLoader workers, each opening its own reader -> sliding-window
probability on the accelerator -> post-processing and measurements in a process pool -> one JSON line per
finished tile in ``<stem>.partial/tiles.jsonl`` -> at the end GeoJSON, CSV and overlay are streamed from that
journal and renamed into place atomically.

Seam rule: every tile is predicted together with a ``halo`` of context around its core (the tile grid
cell), and a nucleus is kept only by the tile whose core contains its centroid. Cores tile the slide without
overlap, so each nucleus is kept once; a halo wider than the largest nucleus makes it whole in that tile.
(Should two neighbouring tiles segment the same nucleus differently, each judges its own version, so a nucleus
whose centroid sits right on a seam can in rare cases be kept twice or not at all.)

Memory does not grow with slide size: no slide-sized array is ever built; the tissue mask and the overlay
live at thumbnail scale; tiles in flight are bounded by the worker counts.

Resume: ``tiles.jsonl`` records finished tiles; ``run.json`` records the settings. Re-running the same command
continues after the finished tiles (a truncated last line is dropped); changed settings start over. Final
files appear only complete; the journal is removed once they are written. A slide whose outputs are complete
and whose ``<stem>_summary.json`` records the same settings is not predicted again, so a folder of slides
interrupted anywhere is finished by re-running the same command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cdcl import __version__
from cdcl.errors import CdclError, from_workers
from cdcl.inference.predictor import Predictor
from cdcl.inference.window import PendingProbability, start_probability
from cdcl.instances.export import NUCLEUS_COLOR, csv_stream, geojson_stream, nucleus_feature
from cdcl.instances.representations import MAP_CHANNELS, representation_of
from cdcl.io import ensure_writable_dir, remove_leftover_temporaries, save_png, write_json_atomic
from cdcl.wsi.grid import Grid, tissue_tiles
from cdcl.wsi.handoff import SHM_FOLDER, SharedTileHandoff, remove_orphaned_blocks, shared_memory_fits, tile_bytes
from cdcl.wsi.journal import Journal, as_recorded, lock_path, read_record
from cdcl.wsi.readers import THUMB_SIDE, SlideReader, choose_level, tissue_mask
from cdcl.wsi.stain import slide_stain
from cdcl.wsi.worker import ready, tile_nuclei_json, yield_to_prediction

log = logging.getLogger(__name__)

OUTPUTS = (".geojson", "_nuclei.csv", "_overlay.png", "_summary.json")  # per slide, after its stem; the summary last


class TileDataset(Dataset):
    """Tiles with their halo, read lazily; each process (DataLoader worker) opens its own reader."""

    def __init__(self, reader: SlideReader, grid: Grid, tiles: list[tuple[int, tuple[int, int, int, int]]]) -> None:
        self.source, self.grid, self.tiles = reader, grid, tiles
        self._reader: SlideReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._reader, self._pid = self.source.reopen(), os.getpid()
        index, core = self.tiles[i]
        box = self.grid.box(core)
        # a tensor: DataLoader workers hand it to the main process in shared memory rather than through a pipe
        return {"index": index, "core": core, "box": box, "image": torch.from_numpy(self.grid.read(self._reader, box))}


def _unchanged(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


def default_workers(device: torch.device) -> int:
    """Post-processing processes when none are asked for. None on a CPU: the forward pass already keeps every
    core busy, so post-processing between tiles is as fast as in a worker (within the noise of
    ``benchmarks/wsi_memory.py`` on 2 cores) and needs ~800 MB less memory. With an accelerator, 4/5 of the CPU
    cores but the main process's; the tile readers (:func:`reader_count`) get the rest."""
    return 0 if device.type == "cpu" else max(1, ((os.cpu_count() or 2) - 1) * 4 // 5)


def _start_pool(workers: int) -> Executor:
    """The post-processing pool, its workers started (and their imports under way) before the first tile."""
    if not workers:
        return _Inline()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=yield_to_prediction)
    for _ in range(workers):
        pool.submit(ready)
    return pool


class _Inline(Executor):
    """Executor stand-in for ``workers=0``: runs each job when submitted."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def reader_count(workers: int) -> int:
    """Tile-reading processes for ``workers`` post-processing ones: one per four, as reading a 1152 px tile costs
    about a quarter of post-processing it (0.10 vs 0.34 core-s on 2 cores). On an H200 one per three was not
    faster (``benchmarks/results/wsi_memory_h200_compare.md``). None without workers: the main process reads."""
    return -(-workers // 4)


def _tile_submitter(
    pool: Executor, workers: int, grid: Grid, channels: int = 1
) -> tuple[Callable[..., Future], contextlib.AbstractContextManager]:
    """``(submit, context)``: ``submit(prob, image, *args)`` queues :func:`tile_nuclei_json` in ``pool`` (``prob``:
    ``channels`` prediction maps). With
    workers, tiles travel through shared memory when /dev/shm has room for every tile in flight, else (a
    container's small /dev/shm) through the pool's pipe. Blocks of earlier, killed runs are removed first."""
    remove_orphaned_blocks()
    block = tile_bytes(grid.tile + 2 * grid.halo, channels)
    if workers and shared_memory_fits((2 * workers + 1) * block):
        handoff = SharedTileHandoff(pool, block)
        return handoff.submit, handoff
    if workers:
        log.info(
            "too little room in %s for %d tiles in flight: tiles go to the workers through a pipe (slower)",
            SHM_FOLDER,
            2 * workers + 1,
        )
    return functools.partial(pool.submit, tile_nuclei_json), contextlib.nullcontext()


def _predict_tiles(
    predictor: Predictor,
    reader: SlideReader,
    grid: Grid,
    todo: list,
    journal: Journal,
    pool: Executor,
    workers: int,
    bar: tqdm,
    options: dict[str, Any],
) -> None:
    """Read (DataLoader workers) -> predict (here, with ``start_probability``'s ``options``) -> post-process
    (pool) -> journal, in tile order.

    Each tile's prediction is queued on the device before the previous tile is handed to post-processing, so
    on an accelerator the main process receives and hands over tiles while the device computes. Tiles reach
    this process, and leave it, through shared memory: it has the forward pass to feed."""
    loader = DataLoader(
        TileDataset(reader, grid, todo),
        batch_size=None,
        num_workers=reader_count(workers),
        collate_fn=_unchanged,
        worker_init_fn=yield_to_prediction,
    )
    channels = MAP_CHANNELS[representation_of(predictor.model)]
    submit, handoff = _tile_submitter(pool, workers, grid, channels)
    pending: deque[tuple[int, Future]] = deque()

    def post_process(item: dict[str, Any], prob: PendingProbability) -> None:
        pending.append(
            (
                item["index"],
                submit(prob.result(), item["image"], predictor.postprocess, item["core"], item["box"], grid.scale),
            )
        )
        while len(pending) > 2 * workers or (pending and pending[0][1].done()):
            index, done = pending.popleft()
            journal.append(index, done.result())
            bar.update(1)

    with handoff:
        previous = None
        for item in from_workers(loader):
            item["image"] = item["image"].numpy()
            prob = start_probability(predictor.model, item["image"], **options)
            if previous is not None:
                post_process(*previous)
            previous = (item, prob)
        if previous is not None:
            post_process(*previous)
        for index, job in pending:
            journal.append(index, job.result())
            bar.update(1)


def write_outputs(
    journal: Journal, out_dir: Path, stem: str, thumbnail: np.ndarray, level0_width: int
) -> tuple[int, float]:
    """GeoJSON, CSV and overlay in one streamed pass over the journal; returns the number of nuclei and their
    summed area (level-0 px²). The outlines are drawn at thumbnail scale, so memory does not depend on the slide
    size."""
    for suffix in OUTPUTS:
        remove_leftover_temporaries(out_dir / f"{stem}{suffix}")  # of an earlier run killed while writing them
    scale = thumbnail.shape[1] / level0_width
    overlay = Image.fromarray(thumbnail)
    draw = ImageDraw.Draw(overlay)
    count, area = 0, 0.0
    with (
        geojson_stream(out_dir / f"{stem}.geojson") as add_feature,
        csv_stream(out_dir / f"{stem}_nuclei.csv") as add_row,
    ):
        for row, ring in journal.nuclei():
            add_feature(nucleus_feature(ring, row, stem))
            add_row(row)
            draw.polygon([(x * scale, y * scale) for x, y in ring], outline=NUCLEUS_COLOR)
            count += 1
            area += row["area"]
    save_png(out_dir / f"{stem}_overlay.png", np.asarray(overlay))
    return count, area


def tissue_area(mask: np.ndarray, reader: SlideReader) -> float:
    """Area of the tissue mask (found on the thumbnail) in level-0 pixels."""
    width, height = reader.dimensions
    return float(mask.sum()) * (width / mask.shape[1]) * (height / mask.shape[0])


def finished_summary(out_dir: Path, stem: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of an earlier run of ``stem`` with these ``settings`` whose outputs are all in place, else
    None. The summary is written after the other outputs, so its presence means they are complete."""
    summary = read_record(out_dir / f"{stem}_summary.json")
    same = summary is not None and summary.get("settings") == as_recorded(settings)
    return summary if same and all((out_dir / f"{stem}{suffix}").is_file() for suffix in OUTPUTS) else None


def _remove_own_journal(folder: Path, settings: dict[str, Any]) -> None:
    """Remove the journal left by a finished run with ``settings``; one of other settings may still be resumed."""
    key = read_record(folder / "run.json")
    if key is not None and all(key.get(name) == value for name, value in as_recorded(settings).items()):
        shutil.rmtree(folder, ignore_errors=True)


def _locked(fh: Any, lock: Path, tries: int = 20) -> bool:
    """Whether this process now holds ``lock`` (open as ``fh``). A few tries 50 ms apart: ``cdcl cohort`` may be
    looking at the lock for a moment (:func:`cdcl.wsi.cohort.is_running`), which is no run holding it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino  # not one a finished run removed
        except FileNotFoundError:
            return False
        except BlockingIOError:
            if attempt < tries - 1:
                time.sleep(0.05)
    return False


@contextlib.contextmanager
def only_run(out_dir: Path, stem: str) -> Iterator[None]:
    """Hold ``<out>/.<stem>.lock`` for the run: a second run of the same slide into the same folder would append
    the same tiles to the journal, and the outputs would list their nuclei twice. It is refused instead. The
    kernel releases the lock of a killed process, so a job or Dask worker that died leaves the slide free for
    the next try, which resumes its journal."""
    lock = lock_path(out_dir, stem)
    with open(lock, "a") as fh:
        if not _locked(fh, lock):
            raise CdclError(
                f"another cdcl predict-wsi is writing the outputs of '{stem}' in this folder; wait for it "
                "to finish or pass another --out",
                out_dir,
            )
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def predict_slide(
    predictor: Predictor,
    reader: SlideReader,
    out_dir: str | Path,
    *,
    stem: str,
    tile: int = 1024,
    halo: int = 64,
    workers: int | None = None,
    run_key: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every tissue tile of ``reader`` and write ``<stem>.geojson``, ``<stem>_nuclei.csv``,
    ``<stem>_overlay.png`` and ``<stem>_summary.json`` into ``out_dir``; returns the summary. ``workers``:
    post-processing processes (None: :func:`default_workers`). ``run_key`` identifies the inputs (the command
    line's: slide and checkpoint files, resolution, device); with one, a slide already finished with the same
    key and tiling is not predicted again, and its summary is returned."""
    start = time.perf_counter()
    workers = default_workers(predictor.device) if workers is None else workers
    out_dir = ensure_writable_dir(out_dir)
    settings = {"cdcl": __version__, **(run_key or {}), "tile": tile, "halo": halo}
    with only_run(out_dir, stem):  # the lock covers the outputs too
        done = finished_summary(out_dir, stem, settings) if run_key is not None else None
        if done is not None:
            _remove_own_journal(out_dir / f"{stem}.partial", settings)  # a run killed just before removing it
            log.info(
                "%s: already done with these settings (%s); delete it to predict again",
                reader.name,
                out_dir / f"{stem}_summary.json",
            )
            return {**done, "skipped": True}
        with _start_pool(workers) as pool:  # its workers start while the slide is opened and its tissue found
            level, residual = choose_level(reader, predictor.mpp)
            grid = Grid.for_slide(reader, level, residual, tile, halo)
            thumbnail = reader.thumbnail(THUMB_SIDE)
            mask = tissue_mask(thumbnail, reader.name)
            tiles = tissue_tiles(grid, mask, reader.dimensions[0])
            key = {**settings, "level": level, "residual": residual, "tiles": [index for index, _ in tiles]}
            journal = Journal(out_dir / f"{stem}.partial", key)
            todo = [t for t in tiles if t[0] not in journal.finished]
            options = predictor.window_options()
            if predictor.stain is not None:
                options["stain"] = slide_stain(predictor.stain, reader, grid, tiles)
            working_mpp = None if reader.mpp is None else reader.mpp * grid.scale
            log.info(
                "%s: %dx%d px, level %d resized x%.3g (%s um/px), %d of %d tiles have tissue, %d already done",
                reader.name,
                *reader.dimensions,
                level,
                1 / residual,
                f"{working_mpp:.3g}" if working_mpp else "?",
                len(tiles),
                len(grid.cores()),
                len(tiles) - len(todo),
            )
            predict_start = time.perf_counter()
            with tqdm(total=len(tiles), initial=len(tiles) - len(todo), desc=stem, unit="tile", disable=None) as bar:
                _predict_tiles(predictor, reader, grid, todo, journal, pool, workers, bar, options)
            predict_seconds = time.perf_counter() - predict_start
        # the outputs are replaced now: a summary of a run with other settings must not vouch for the new ones
        (out_dir / f"{stem}_summary.json").unlink(missing_ok=True)
        n_nuclei, nuclei_area = write_outputs(journal, out_dir, stem, thumbnail, reader.dimensions[0])
        um2_per_px = None if reader.mpp is None else reader.mpp**2  # a level-0 pixel's area
        megapixels = sum((x1 - x0) * (y1 - y0) for _, (x0, y0, x1, y1) in todo) / 1e6
        summary = {
            "slide": reader.name,
            "level0_size": list(reader.dimensions),
            "slide_mpp": reader.mpp,
            "level": level,
            "working_mpp": working_mpp,
            "level0_px_per_working_px": grid.scale,
            "tile": tile,
            "halo": halo,
            "workers": workers,
            "stain_norm": None if options.get("stain") is None else predictor.stain.method,
            "tiles": {
                "grid": len(grid.cores()),
                "tissue": len(tiles),
                "predicted_now": len(todo),
                "resumed": len(tiles) - len(todo),
            },
            "nuclei": n_nuclei,
            "tissue_mm2": None if um2_per_px is None else round(tissue_area(mask, reader) * um2_per_px / 1e6, 6),
            "mean_nucleus_area_um2": (
                round(nuclei_area / n_nuclei * um2_per_px, 3) if um2_per_px is not None and n_nuclei else None
            ),
            "seconds_predict": round(predict_seconds, 3),
            "seconds": round(time.perf_counter() - start, 3),
            "megapixels_predicted": round(megapixels, 3),
            "megapixels_per_s": round(megapixels / predict_seconds, 3) if todo else None,
            "settings": settings,
        }
        write_json_atomic(out_dir / f"{stem}_summary.json", summary)
        shutil.rmtree(journal.folder)
    return summary
