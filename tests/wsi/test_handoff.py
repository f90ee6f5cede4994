"""Tiles handed to post-processing workers through reusable shared-memory blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

from cdcl.instances.postprocess import PostprocessParams
from cdcl.testing.slides import disc_image
from cdcl.wsi.handoff import PREFIX, SharedTileHandoff, remove_orphaned_blocks, shared_memory_fits, tile_bytes
from cdcl.wsi.worker import tile_nuclei_json


def tiles() -> list[tuple[np.ndarray, np.ndarray, tuple, tuple]]:
    """Four (prob, image, core, box) tiles of different sizes cut from the disc slide."""
    image, _ = disc_image()
    prob = (image.mean(axis=2) < 150).astype(np.float32) * 0.9
    out = []
    for x0, y0, x1, y1 in [(0, 0, 200, 200), (150, 100, 470, 300), (0, 300, 120, 460), (300, 300, 470, 460)]:
        box = (x0, y0, x1, y1)
        out.append((prob[y0:y1, x0:x1], image[y0:y1, x0:x1], box, box))
    return out


def test_workers_get_the_tiles_through_reused_blocks_and_none_is_left_behind():
    params = PostprocessParams()
    expected = [tile_nuclei_json(prob, image, params, core, box, 1.0) for prob, image, core, box in tiles()]
    assert all(json.loads(e) for e in expected)  # every tile holds nuclei
    with (
        ProcessPoolExecutor(1, mp_context=get_context("forkserver")) as pool,
        SharedTileHandoff(pool, tile_bytes(320)) as handoff,
    ):
        got = []
        for _ in range(3):  # one at a time: each tile reuses the first block
            got += [handoff.submit(prob, image, params, core, box, 1.0).result() for prob, image, core, box in tiles()]
        names = [block.name for block in handoff._blocks]
        assert len(names) == 1
        both = [handoff.submit(prob, image, params, core, box, 1.0) for prob, image, core, box in tiles()[:2]]
        got_both = [job.result() for job in both]
        assert len(handoff._blocks) <= 2
        names = [block.name for block in handoff._blocks]
    assert got == expected * 3 and got_both == expected[:2]
    for name in names:  # closed and unlinked
        with pytest.raises(FileNotFoundError):
            SharedMemory(name=name)


def test_a_tile_larger_than_the_blocks_is_refused():
    prob, image, core, box = tiles()[1]  # 320 x 200
    with SharedTileHandoff(None, tile_bytes(256)) as handoff, pytest.raises(ValueError, match="does not fit"):
        handoff.submit(prob, image, PostprocessParams(), core, box, 1.0)


def test_shared_memory_room_is_checked_before_use(tmp_path):
    assert shared_memory_fits(1024, str(tmp_path))
    assert not shared_memory_fits(2**62, str(tmp_path))
    assert not shared_memory_fits(1024, str(tmp_path / "missing"))
    assert tile_bytes(1152) == 1152 * 1152 * 7


def test_blocks_of_dead_processes_are_removed_and_others_kept(tmp_path):
    """A killed process group leaves its blocks in /dev/shm (memory); the next run removes them."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = int(gone.stdout)
    names = [
        f"{PREFIX}{dead}-0a1b2c3d",
        f"{PREFIX}{os.getpid()}-0a1b2c3d",
        f"{PREFIX}1-0a1b2c3d",
        "psm_0a1b2c3d",
        f"{PREFIX}x-1",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"tile")
    assert remove_orphaned_blocks(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])  # own, init's (alive), foreign, malformed
    assert remove_orphaned_blocks(str(tmp_path / "missing")) == 0


def test_blocks_are_named_for_their_process():
    with (
        ProcessPoolExecutor(1, mp_context=get_context("forkserver")) as pool,
        SharedTileHandoff(pool, tile_bytes(320)) as handoff,
    ):
        prob, image, core, box = tiles()[0]
        handoff.submit(prob, image, PostprocessParams(), core, box, 1.0).result()
        assert handoff._blocks[0].name.startswith(f"{PREFIX}{os.getpid()}-")
        assert os.path.exists(f"/dev/shm/{handoff._blocks[0].name}")


def test_two_channel_maps_of_a_learned_representation_travel_intact():
    """A three-class or distance head hands over (foreground, marker strength): both maps reach the worker."""
    params = PostprocessParams()
    two = [(np.stack([prob, prob]), image, core, box) for prob, image, core, box in tiles()]
    expected = [tile_nuclei_json(maps, image, params, core, box, 1.0) for maps, image, core, box in two]
    assert all(json.loads(e) for e in expected)
    with (
        ProcessPoolExecutor(1, mp_context=get_context("forkserver")) as pool,
        SharedTileHandoff(pool, tile_bytes(320, channels=2)) as handoff,
    ):
        got = [handoff.submit(maps, image, params, core, box, 1.0).result() for maps, image, core, box in two]
    assert got == expected
