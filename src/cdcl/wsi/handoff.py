"""Tiles handed to the post-processing workers through reusable shared-memory blocks instead of a pipe.

A process pool pickles every argument through one pipe, written by one thread of the main process: 9 MB per
1152 px tile (probability + pixels) made that pipe, not the workers, the limit of ``cdcl predict-wsi`` with a
GPU. Here the main process copies the tile into a shared block (a memcpy) and sends the block's name; the
worker copies it out at once, so the block is free again for a later tile. Blocks are reused because a fresh
one costs a page fault per 4 kB on first write, as much as the pipe.

Blocks are named ``cdcl-tile-<pid>-<random>``. Python's resource tracker removes them if the main process dies,
but not when the whole process group is killed (``kill -9 -PGID``, a container stop): the next run then removes
the blocks of processes that no longer exist (:func:`remove_orphaned_blocks`), as /dev/shm is memory.

Nothing here imports torch (the workers import it).
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import Executor, Future
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from cdcl.wsi.worker import tile_nuclei_json

SHM_FOLDER = "/dev/shm"  # where Linux keeps POSIX shared memory; containers often size it at only 64 MB
PREFIX = "cdcl-tile-"


def tile_bytes(side: int, channels: int = 1) -> int:
    """Bytes of one tile of at most ``side`` x ``side`` px: ``channels`` float32 prediction maps + RGB pixels."""
    return side * side * (4 * channels + 3)


def shared_memory_fits(total_bytes: int, folder: str = SHM_FOLDER) -> bool:
    """Whether ``folder`` has room for ``total_bytes`` with as much again to spare. Writing past a full
    /dev/shm kills the process with SIGBUS rather than raising, so the room is checked before, not caught."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= 2 * total_bytes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_orphaned_blocks(folder: str = SHM_FOLDER) -> int:
    """Remove the blocks left in ``folder`` by cdcl processes that no longer exist; returns how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                continue
    return removed


class SharedTileHandoff:
    """``submit(prob, image, *args)`` runs :func:`tile_nuclei_json` in ``pool`` on a tile sent through shared
    memory; ``close`` (or leaving the ``with`` block) removes the blocks."""

    def __init__(self, pool: Executor, block_bytes: int) -> None:
        self.pool, self.block_bytes = pool, block_bytes
        self._blocks: list[SharedMemory] = []
        self._in_use: list[tuple[Future, SharedMemory]] = []

    def submit(self, prob: np.ndarray, image: np.ndarray, *args: Any) -> Future:
        """``prob``: the tile's prediction maps, HxW or CxHxW."""
        maps_shape = prob.shape
        height, width = maps_shape[-2:]
        if tile_bytes(max(height, width), prob.size // (height * width)) > self.block_bytes:
            raise ValueError(f"a {height}x{width} tile does not fit blocks of {self.block_bytes} bytes")
        block = self._free_block()
        block_prob, block_image = _tile_views(block, maps_shape)
        block_prob[:] = prob
        block_image[:] = image
        del block_prob, block_image  # no view may outlive its block (close would refuse)
        future = self.pool.submit(tile_nuclei_from_shared, block.name, maps_shape, *args)
        self._in_use.append((future, block))
        return future

    def _free_block(self) -> SharedMemory:
        """A block whose job has finished (the worker copied the tile out long before), else a new one."""
        for i, (future, block) in enumerate(self._in_use):
            if future.done():
                del self._in_use[i]
                return block
        block = SharedMemory(f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}", create=True, size=self.block_bytes)
        self._blocks.append(block)
        return block

    def close(self) -> None:
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks.clear()
        self._in_use.clear()

    def __enter__(self) -> SharedTileHandoff:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tile_views(block: SharedMemory, maps_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The block's layout, shared by both sides: float32 prediction maps, then the RGB pixels."""
    prob = np.ndarray(maps_shape, np.float32, block.buf)
    return prob, np.ndarray((*maps_shape[-2:], 3), np.uint8, block.buf, offset=prob.nbytes)


def tile_nuclei_from_shared(name: str, maps_shape: tuple[int, ...], *args: Any) -> str:
    """Worker side of :class:`SharedTileHandoff`: copy the tile out of its block, then :func:`tile_nuclei_json`."""
    block = SharedMemory(name=name)
    prob, image = (view.copy() for view in _tile_views(block, maps_shape))
    block.close()
    return tile_nuclei_json(prob, image, *args)
