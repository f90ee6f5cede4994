"""Killed runs (SIGKILL: no cleanup, as a pre-empted job): ``cdcl train`` never leaves an unreadable
``last.pt`` and, re-run, resumes to exactly the weights of an uninterrupted run (CPU, deterministic mode);
``cdcl predict-wsi`` never shows a truncated file under a final name and, re-run, finishes the same files."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cdcl.checkpoint import load_checkpoint
from cdcl.wsi.cohort import HISTOGRAM, TABLE
from cdcl.wsi.handoff import remove_orphaned_blocks

from helpers.cli_cases import Running, World, assert_ok, run_cdcl, start_cdcl, stray_files, write_slide

ITERATIONS = 8
SLIDE_OUTPUTS = ("slide.geojson", "slide_nuclei.csv", "slide_overlay.png", "slide_summary.json")
RUN_OUTPUTS = (TABLE, HISTOGRAM)  # the cohort table every predict-wsi run ends with


def train_args(world: World, run: Path) -> list[str]:
    """CDCL (every loss term and the memory bank), a checkpoint every 2 of 8 iterations."""
    return world.train_args(run, "method.threshold=0.0", "train.val_every=2", method="cdcl", iterations=ITERATIONS)


def wait_until(
    running: Running, condition: Callable[[], bool], timeout: float, invariant: Callable[[], None] = lambda: None
) -> bool:
    """Poll every millisecond: True once ``condition()`` holds, False if the process ends or time runs out;
    ``invariant()`` (assertions that must hold all along) is checked at every poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        invariant()
        if condition():
            return True
        if running.poll() is not None:
            return False
        time.sleep(0.001)
    return False


def temporaries(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}.*.tmp"))


def checkpoint_state(run: Path) -> dict[str, int | None]:
    """Step of last.pt and best.pt (None when absent); each present one must load and hold finite weights."""
    steps = {}
    for name in ("last.pt", "best.pt"):
        path = run / name
        if not path.exists():
            steps[name] = None
            continue
        payload = load_checkpoint(path)  # raises on a truncated or corrupt file
        weights = payload["weights"]  # last.pt: student and teacher; best.pt: the weights it predicts with
        assert all(torch.isfinite(v).all() for w in weights.values() for v in w.values() if v.is_floating_point())
        steps[name] = payload["step"]
    return steps


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> dict:
    """Weights and loss log of an uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(run_cdcl(*train_args(world, run)))
    return {"weights": load_checkpoint(run / "last.pt")["weights"], "log": losses(run)}


def losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "val/", "iteration"))} for r in rows]


def progress(run: Path) -> int:
    """The last iteration logged in metrics.jsonl (complete lines only)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return max((json.loads(line)["iteration"] for line in text[: text.rfind("\n") + 1].splitlines()), default=0)


# A kill as soon as a checkpoint's temporary file appears lands mid-write (torch.save + fsync); a random kill
# comes once a random iteration (before the last) is logged, plus up to 50 ms.
KILLS = [
    ("best.pt", "SIGKILL while best.pt is being written"),
    ("last.pt", "SIGKILL while last.pt is being written"),
    ("random", "SIGKILL at a random moment"),
    ("last.pt", "SIGKILL while last.pt is being written, again"),
    ("random", "SIGKILL at a random moment"),
]


def test_train_killed_at_any_moment_resumes_to_the_same_weights(world, reference, tmp_path, record):
    run = tmp_path / "run"
    rng = random.Random(7)
    mid_write = 0
    for moment, given in KILLS:
        running = start_cdcl(*train_args(world, run))
        if moment == "random":
            target, delay = rng.randint(1, ITERATIONS - 1), rng.randint(0, 50)
            given = f"{given} (once iteration {target} is logged, + {delay} ms)"
            wait_until(running, lambda: progress(run) >= target, timeout=120)
            time.sleep(delay / 1000)
        else:
            wait_until(running, lambda: bool(temporaries(run, moment)), timeout=120)
        running.kill()
        result = running.wait()
        during_write = moment != "random" and bool(temporaries(run, moment))
        mid_write += during_write
        steps = checkpoint_state(run)
        outcome = f"killed{' mid-write' if during_write else ''}; last.pt " + (
            "absent (no checkpoint yet)" if steps["last.pt"] is None else f"loads (iteration {steps['last.pt']})"
        )
        record("train", given, result, "killed; last.pt readable", message="(killed by SIGKILL)", outcome=outcome)
        assert result.rc == -9, result.stderr[-2000:]
    assert mid_write >= 2, "no kill landed during a checkpoint write"
    assert not load_checkpoint(run / "last.pt")["complete"]
    with open(run / "metrics.jsonl", "a") as fh:  # as a kill in the middle of a log append would leave it
        fh.write('{"iteration": 5, "lr": 0.0009, "loss/to')

    final = run_cdcl(*train_args(world, run))
    assert_ok(final)
    resumed = load_checkpoint(run / "last.pt")
    same = all(
        torch.equal(value, resumed["weights"][which][key])
        for which in ("student", "teacher")
        for key, value in reference["weights"][which].items()
    )
    record(
        "train",
        "re-run of the same command after the kills (metrics.jsonl ending in half a line)",
        final,
        "exit 0, same weights",
        outcome="resumed; weights and loss log identical to an uninterrupted run"
        if same
        else "resumed; WEIGHTS DIFFER",
    )
    assert resumed["step"] == ITERATIONS and resumed["complete"]
    assert same, "resumed weights differ from the uninterrupted run"
    assert losses(run) == reference["log"]
    assert not stray_files(run), stray_files(run)  # temporaries of killed writes are cleared on resume


# ---- predict-wsi -----------------------------------------------------------------------------------------------


def wsi_args(world: World, slide: Path, out: Path, workers: int = 1) -> list[str]:
    return [
        "predict-wsi",
        "--checkpoint",
        str(world.checkpoint),
        str(slide),
        "--out",
        str(out),
        "--tile",
        "256",
        "--halo",
        "32",
        "--workers",
        str(workers),
        "--device",
        "cpu",
    ]


def journal_lines(out: Path) -> int:
    path = out / "slide.partial" / "tiles.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def assert_final_files_complete(out: Path) -> None:
    """Whatever exists under a final name is complete (checked while the command runs and after each kill)."""
    geojson, table = out / "slide.geojson", out / "slide_nuclei.csv"
    if geojson.exists():
        json.loads(geojson.read_text())
    if table.exists():
        assert table.read_text().endswith("\n")


def test_predict_wsi_killed_mid_run_resumes_to_the_same_files(world, tmp_path, record):
    slide = write_slide(tmp_path / "slide.tif", 576, 1088)
    reference = tmp_path / "reference"
    assert_ok(run_cdcl(*wsi_args(world, slide, reference, workers=0)))  # same files whatever the worker count

    out = tmp_path / "out"
    kills = [
        (lambda: journal_lines(out) >= 3, "SIGKILL after 3 tiles"),
        (lambda: bool(temporaries(out, "slide.geojson")), "SIGKILL while the GeoJSON is written"),
    ]
    killed = []
    for condition, given in kills:
        running = start_cdcl(*wsi_args(world, slide, out))
        wait_until(running, condition, timeout=120, invariant=lambda: assert_final_files_complete(out))
        running.kill()
        result = running.wait()
        assert_final_files_complete(out)
        finals = sorted(p.name for p in out.iterdir() if p.name in SLIDE_OUTPUTS)
        record(
            "predict-wsi",
            given,
            result,
            "killed; no truncated output",
            message="(killed by SIGKILL)",
            outcome=f"killed; {journal_lines(out)} tiles journalled; "
            f"final files present: {', '.join(finals) or 'none'} (complete)",
        )
        assert result.rc in (-9, 0)  # 0: it finished before the kill (the GeoJSON write can be quicker than a poll)
        killed.append(result.rc == -9)

    final = run_cdcl(*wsi_args(world, slide, out))
    assert_ok(final)
    assert not remove_orphaned_blocks(), "blocks of the killed runs were left in /dev/shm"  # the final run removed them
    same = all(
        (out / name).read_bytes() == (reference / name).read_bytes() for name in ("slide.geojson", "slide_nuclei.csv")
    )
    summary = json.loads((out / "slide_summary.json").read_text())
    record(
        "predict-wsi",
        "re-run of the same command after the kills",
        final,
        "exit 0, same files",
        outcome=f"resumed {summary['tiles']['resumed']} of {summary['tiles']['tissue']} tiles; GeoJSON and CSV "
        + ("identical to an uninterrupted run" if same else "DIFFER"),
    )
    assert same
    assert killed[0], "the first kill came after the run had finished"
    if killed[1]:  # the second run had journalled every tile before it was killed in the final write
        assert summary["tiles"]["resumed"] == summary["tiles"]["tissue"]
    assert sorted(p.name for p in out.iterdir()) == sorted(SLIDE_OUTPUTS + RUN_OUTPUTS)
