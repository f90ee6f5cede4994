"""Where a benchmark number came from: the commit and the machine it was measured on (shared by every benchmark
script)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """HEAD, marked when src/ has uncommitted changes; ``CDCL_GIT_COMMIT`` for a copy of the tree without .git
    (e.g. a borrowed GPU machine); "unknown" without git."""
    if os.environ.get("CDCL_GIT_COMMIT"):
        return os.environ["CDCL_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (src/ has uncommitted changes)" if dirty else "")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return cpu


def machine(**versions: object) -> dict:
    """The CPU a timing ran on: model, core count, Python, then ``versions`` (libraries, thread settings) in the
    order given."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(), **versions}


def torch_timing_header(script: str, argv: list[str]) -> dict:
    """The command, commit and machine (with torch's version and thread settings) of a torch timing run."""
    import torch

    return {
        "command": " ".join(["python", script, *argv]),
        "git_commit": git_commit(),
        "machine": machine(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"),
        ),
    }


def accelerator_machine() -> dict:
    """Where a training run ran: the platform, Python, torch and the CUDA device (None on a CPU)."""
    import torch  # only here: the other helpers serve benchmarks that never load torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
