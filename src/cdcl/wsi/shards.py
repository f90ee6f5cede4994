"""``--shard K/N``: the K-th of N stable shares of a slide list, for a scheduler's job array (one job per share).

A slide's share is its position in the list sorted by file name, modulo N: every job that sees the same list
picks the same slides, whichever jobs start first, and the N shares hold every slide exactly once and differ
in size by one at most. (The list must not change while the array runs: add slides, and the shares move.)
This module imports nothing heavy: the CLI checks ``--shard`` with it before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cdcl.errors import CdclError


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N (an argparse ``type=``); anything else is a one-line CdclError."""
    k, slash, n = text.partition("/")
    try:
        share, count = int(k), int(n)
    except ValueError:
        share = count = 0
    if not slash or not 1 <= share <= count:
        raise CdclError(f"--shard must be K/N with 1 <= K <= N (e.g. 3/8 for the third of 8 jobs), got '{text}'")
    return share, count


def shard(paths: Sequence[Path], share: int, count: int) -> list[Path]:
    """The slides of share ``share`` (1-based) of ``count``: every ``count``-th of the list sorted by name."""
    ordered = sorted(paths, key=lambda path: (path.name, str(path)))
    return ordered[share - 1 :: count]
