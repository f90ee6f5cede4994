"""Where a benchmark number came from: the commit it was measured at (shared by every benchmark script)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD, marked when src/ has uncommitted changes; ``CDCL_GIT_COMMIT`` for a copy of the tree without .git
    (e.g. a borrowed GPU machine); "unknown" without git."""
    if os.environ.get("CDCL_GIT_COMMIT"):
        return os.environ["CDCL_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (src/ has uncommitted changes)" if dirty else "")
