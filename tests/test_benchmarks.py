"""The sweep's bookkeeping: merging results from concurrent runners, the plan, bad selectors, protocol 1 records
kept apart, the tables, the paired gaps and their intervals."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from cdcl.config import load_config

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
    assert (tmp_path / "quality_protocol1.png").stat().st_size > 10_000
    assert not (tmp_path / "quality.png").exists()  # the budget plot of protocol 2 needs protocol 2 records


def test_only_prefixes_set_the_order_of_runs(quality):
    keys = [r.key for r in quality.select(quality.plan(), ["dsb2018/1-8/seed1", "monuseg/1-8/seed0/cdcl-no-"])]
    assert keys[:5] == [f"dsb2018/1-8/seed1/{m}" for m in quality.PLAN_METHODS]
    assert keys[5:] == [f"monuseg/1-8/seed0/{name}" for name in quality.ABLATIONS]
    assert quality.select(quality.plan(), []) == quality.plan()


def test_paper_setting_runs_train_the_paper_model_at_1_16(quality):
    runs = [r for r in quality.plan() if r.name in quality.PAPER_SETTING]
    assert [r.key for r in runs[:2]] == ["monuseg/1-16/seed0/supervised-paper", "monuseg/1-16/seed0/cdcl-paper"]
    assert len(runs) == 2 * quality.TRACK_SEEDS
    for run in runs:
        config = load_config(REPO / run.config, quality.train_sets(run, []))
        assert (config.model.encoder, config.augment.crop_size, config.method.name) == ("densenet161", 320, run.method)
        assert config.data.split_dir.endswith(f"1-16/seed{run.seed}")


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


def test_plan_seeds_noise_floor_and_cross_dataset_rows(quality):
    runs = quality.plan()
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    seeds = {}
    for r in runs:
        seeds.setdefault((r.dataset, r.budget, r.name), set()).add(r.train_seed)
    for method in quality.PLAN_METHODS:
        assert seeds[("monuseg", "1-32", method)] == seeds[("monuseg", "1-16", method)] == set(range(5))
        assert seeds[("monuseg", "1-8", method)] == set(range(3))
        for track in ("monuseg-organ", "dsb2018-type", "monuseg->dsb-tissue", "dsb-fluo->dsb-tissue"):
            assert seeds[(track, "1-16", method)] == set(range(3))
    assert seeds[("monuseg", "full", "supervised")] == set(range(3))
    floor = [r for r in runs if r.name == "noise-floor"]
    assert [(r.key, r.seed, r.train_seed) for r in floor] == [
        (f"monuseg/1-16/seed{s}/noise-floor", 0, s) for s in range(5)
    ]
    by_key = {r.key: r for r in runs}
    assert floor[0].run_dir == by_key["monuseg/1-16/seed0/supervised"].run_dir  # one training, not two
    assert len({r.run_dir for r in floor}) == 5
    cross = by_key["monuseg->dsb-tissue/1-16/seed2/cdcl"]
    assert cross.run_dir == by_key["monuseg/1-16/seed2/cdcl"].run_dir and "->" not in str(cross.run_dir)


def test_list_works_and_bad_selectors_exit_2_with_one_line():
    script = [sys.executable, str(REPO / "benchmarks" / "quality.py")]
    listed = subprocess.run([*script, "--list", "--only", "monuseg/1-32"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 25 and "monuseg/1-32/seed4/unimatch" in listed.stdout
    for bad, what in [
        (["--only", "monuseg/1-7"], "unknown budget '1-7'"),
        (["--only", "monuseg-organs"], "unknown dataset 'monuseg-organs'"),
        (["--key", "monuseg/1-16/seed0/cdcl2"], "unknown method 'cdcl2'"),
        (["--key", "dsb2018-type/full/seed0/cdcl"], "no planned run has this key"),
    ]:
        done = subprocess.run([*script, "--list", *bad], capture_output=True, text=True)
        assert done.returncode == 2 and what in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def v2_record(quality, method: str, seed: int, dice: float, aji: float, dataset: str = "monuseg") -> dict:
    rec = record(method, seed, dice, aji)
    rec |= {"protocol": 2, "dataset": dataset, "split_seed": seed, "best_checkpoint": {"mean": dict(rec["mean"])}}
    rec |= {"last_thresholds": "tuned on val for the last weights", "train_command": "cdcl train", "eval_commands": []}
    return rec | {"settings": {"config": f"configs/monuseg_{method}.yaml", "overrides": []}}


def test_protocol1_records_are_kept_and_tabulated_apart(quality, tmp_path):
    old = record("cdcl", 0, 0.70, 0.50)
    quality.record_result("monuseg/1-16/seed0/cdcl", old)
    quality.record_result("monuseg/1-16/seed0/cdcl", v2_record(quality, "cdcl", 0, 0.75, 0.55))
    results = quality.load_results()
    assert results["runs"]["monuseg/1-16/seed0/cdcl"] == old
    assert results["protocol2"]["monuseg/1-16/seed0/cdcl"]["protocol"] == 2
    quality.report(results)
    text = (tmp_path / "quality.md").read_text()
    protocol2, protocol1 = text.split("## Protocol 1")
    assert "| monuseg | 1/16 | cdcl | 0.750 (n=1) |" in protocol2
    assert "| monuseg | 1/16 | cdcl | 0.700 (n=1) |" in protocol1
    assert all((tmp_path / png).stat().st_size > 10_000 for png in ("quality.png", "quality_protocol1.png"))


def test_a_key_recorded_with_other_settings_is_refused(quality):
    run = next(r for r in quality.plan() if r.key == "monuseg/1-16/seed1/cdcl")
    results = {"protocol2": {run.key: {"settings": quality.settings(run, [])}}}
    quality.refuse_other_settings([run], results, [])  # same settings: the run is just done
    with pytest.raises(quality.CdclError, match="'monuseg/1-16/seed1/cdcl' is recorded with other settings"):
        quality.refuse_other_settings([run], results, ["train.iterations=2000"])


def test_a_protocol2_record_of_another_protocol_is_refused(quality, tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps({"runs": {}, "protocol2": {"k": {"protocol": 1}}}))
    with pytest.raises(quality.CdclError, match="record 'k' under 'protocol2' has protocol 1"):
        quality.load_results()


def test_t_interval_and_paired_gap_rows_on_a_hand_made_example(quality):
    mean, low, high = quality.t_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.302653
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / 3**0.5, abs=1e-6) and low == 4.0 - high
    assert all(x != x for x in quality.t_interval([5.0])[1:])  # one value: no interval (NaN bounds)
    runs = [v2_record(quality, "supervised", s, 0.70, 0.50) for s in range(3)]
    runs += [v2_record(quality, "cdcl", s, 0.70 + d, 0.50 + d) for s, d in enumerate((0.01, 0.02, 0.03))]
    lines = quality.v2_gaps(quality.group({str(i): r for i, r in enumerate(runs)}))
    assert (
        lines[2]
        == "| monuseg | 1/16 | cdcl | supervised | 3 | +2.0 [-0.5, +4.5] | +2.0 [-0.5, +4.5] | +2.0 [-0.5, +4.5] |"
    )


def test_gap_picture_and_noise_floor_from_protocol2_records(quality, tmp_path):
    runs = [v2_record(quality, "supervised", s, 0.70, 0.50) for s in range(3)]
    runs += [v2_record(quality, "cdcl", s, 0.71, 0.52) for s in range(3)]
    runs += [v2_record(quality, "noise-floor", s, 0.70 + 0.01 * s, 0.50) for s in range(3)]
    groups = quality.group({str(i): r for i, r in enumerate(runs)})
    quality.plot_gaps(groups)
    assert (tmp_path / "quality_gaps.png").stat().st_size > 10_000
    line = quality.noise_floor(groups)
    assert "Dice 1.00, AJI 0.00" in line and "(n=3); trained with an earlier version of the config" in line
