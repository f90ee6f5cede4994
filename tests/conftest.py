"""Shared fixtures. Real data lives in ../shared/data beside the repository root; missing data is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and OpenMP spinning on a busy 2-core machine costs ~10x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real datasets (MoNuSeg, DSB2018). Fails, never skips, when absent."""
    if not (SHARED_DATA / "monuseg").is_dir() or not (SHARED_DATA / "dsb2018").is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repository root)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, split and trained checkpoint for the CLI suites (one per test module)."""
    from helpers.cli_cases import tiny_world

    return tiny_world(tmp_path_factory)


@pytest.fixture
def record(request):
    """Records each CLI case for docs/RELIABILITY.md when CDCL_RELIABILITY_JSON is set."""
    from helpers.cli_cases import Recorder

    return Recorder.for_test(request)
