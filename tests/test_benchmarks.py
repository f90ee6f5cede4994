"""The sweep's bookkeeping: merging results from concurrent runners, the tables and the paired gaps."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_quality(results_dir: Path):
    """benchmarks/quality.py as a module (registered first: its dataclasses look their module up), writing to
    ``results_dir``."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))  # as when run as a script: its helpers sit beside it
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module
    spec.loader.exec_module(module)
    module.RESULTS = results_dir
    return module


@pytest.fixture
def quality(tmp_path):
    return load_quality(tmp_path)


def record(method: str, seed: int, dice: float, aji: float, budget: str = "1-16", cuda: str | None = None) -> dict:
    return {
        "dataset": "monuseg",
        "budget": budget,
        "seed": seed,
        "name": method,
        "method": method,
        "mean": {"dice": dice, "iou": dice - 0.15, "aji": aji, "pq": aji - 0.07, "precision": aji + 0.1},
        "val_dice_curve": [[500, dice + 0.01], [1000, dice]],
        "median_s_per_iter": 0.05 if cuda else 2.0,
        "machine": {"cuda": cuda, "cpus": 2},
    }


def _merge(args: tuple) -> None:
    results_dir, prefix = args
    module = load_quality(Path(results_dir))
    for seed in range(25):
        module.record_result(f"{prefix}/seed{seed}", record("cdcl", seed, 0.7, 0.5))


def test_concurrent_runners_never_drop_each_others_results(quality, tmp_path):
    prefixes = [f"runner{i}" for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_merge, [(str(tmp_path), p) for p in prefixes])
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert sorted(runs) == sorted(f"{p}/seed{s}" for p in prefixes for s in range(25))


def test_paired_gaps_are_per_seed_differences_in_points(quality):
    runs = [
        record("supervised", 0, 0.70, 0.50),
        record("cdcl", 0, 0.73, 0.54),
        record("supervised", 1, 0.80, 0.60),
        record("cdcl", 1, 0.81, 0.62, cuda="H200"),
        record("supervised", 2, 0.75, 0.55),
    ]  # seed 2 has no CDCL run: not paired
    groups = {}
    for r in runs:
        groups.setdefault(("monuseg", r["budget"], r["name"]), []).append(r)
    lines = quality.paired_gaps(groups)
    assert lines[2] == "| 1/16 | cdcl | supervised | 2 | 2.0 ± 1.4 (n=2) | 3.0 ± 1.4 (n=2) | 3.0 ± 1.4 (n=2) |"
    assert len(lines) == 3  # no Mean Teacher or FixMatch runs: no rows for them


def test_report_keeps_gpu_and_cpu_speeds_apart(quality, tmp_path):
    results = {
        "runs": {
            f"k{i}": r
            for i, r in enumerate([record("cdcl", 0, 0.73, 0.54), record("cdcl", 1, 0.81, 0.62, cuda="H200")])
        }
    }
    quality.report(results)
    table = (tmp_path / "quality.md").read_text()
    assert "| monuseg | 1/16 | cdcl | 0.770 ± 0.057 (n=2) |" in table
    assert "2-core CPU 2.00 (n=1); H200 0.05 (n=1)" in table
    timed = [
        dict(r, train_seconds=t, eval_seconds=20.0)
        for r, t in ((record("cdcl", s, 0.7, 0.5, cuda="H200"), t) for s, t in enumerate((80.0, 95.0, 120.0)))
    ]
    assert quality.speed(timed) == "H200 0.05, 95 + 20 s (n=3)"
    assert (tmp_path / "quality.png").stat().st_size > 10_000


def test_only_prefixes_set_the_order_of_runs(quality):
    keys = [r.key for r in quality.select(quality.plan(), ["dsb2018/1-8/seed1", "monuseg/1-8/seed0/cdcl-no-"])]
    methods = len(quality.METHODS)
    assert keys[:methods] == [f"dsb2018/1-8/seed1/{m}" for m in quality.METHODS]
    assert keys[methods:] == [f"monuseg/1-8/seed0/{name}" for name in quality.ABLATIONS]
    assert quality.select(quality.plan(), []) == quality.plan()


def test_postprocess_speed_benchmark_checks_old_and_new_agree(tmp_path, shared_data):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "postprocess_speed.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "postprocess_speed.json").read_text())
    assert result["identical"] == len(result["maps"]) == 4
    assert all(
        m["nuclei"] > 50 and m["seconds"]["old"] > 0 and m["seconds"]["new"] > 0 for m in result["maps"].values()
    )
    assert "| 3 images |" in (tmp_path / "postprocess_speed.md").read_text()
