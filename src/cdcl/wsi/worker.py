"""What a post-processing worker of ``cdcl predict-wsi`` runs: one tile's nuclei, as JSON text.

Nothing here imports torch, so the post-processing pool of ``cdcl.wsi.pipeline`` starts its workers in a
fraction of the time and memory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cdcl.instances.export import label_centroids, nuclei_polygons, nuclei_table
from cdcl.instances.postprocess import instances_from_maps


def tile_nuclei(
    prob: np.ndarray, image: np.ndarray, params: Any, core: tuple[int, ...], box: tuple[int, ...], scale: float
) -> list[list]:
    """``[measurements, ring]`` (level-0 pixels) of the nuclei whose centroid lies in the tile's core: the seam
    rule of ``cdcl.wsi.pipeline``. ``prob`` (prediction maps, HxW or 2xHxW) and ``image`` cover ``box`` (the core plus
    halo), all in working pixels."""
    labels = instances_from_maps(prob, params)
    ids, x, y = label_centroids(labels, origin=box[:2])
    x0, y0, x1, y1 = core
    labels = np.where(np.isin(labels, ids[(x0 <= x) & (x < x1) & (y0 <= y) & (y < y1)]), labels, 0)
    offset = (box[0] * scale, box[1] * scale)
    rows = nuclei_table(labels, image, offset=offset, scale=scale)
    return [[row, ring] for row, (_, ring) in zip(rows, nuclei_polygons(labels, offset=offset, scale=scale))]


def tile_nuclei_json(*args: Any) -> str:
    """:func:`tile_nuclei` as JSON text, serialised in the post-processing worker rather than the main process."""
    return json.dumps(tile_nuclei(*args), separators=(",", ":"))


def yield_to_prediction(worker_id: int | None = None) -> None:
    """Lower this process's CPU priority: tile readers and post-processing workers give way to the forward pass,
    whose threads would otherwise all wait on the one a worker displaced (measured: ``benchmarks/wsi_memory.py``).
    Serves as a pool initializer and as a DataLoader ``worker_init_fn`` (which passes ``worker_id``)."""
    if hasattr(os, "nice"):  # POSIX only
        os.nice(5)


def ready() -> None:
    """A no-op for the post-processing pool's first jobs: a worker imports this module (about a second) on its
    first job, so ``cdcl.wsi.pipeline`` sends these while the slide is being opened rather than with the first tile."""
