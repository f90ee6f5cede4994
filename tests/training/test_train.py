"""The training engine: every method runs, every loss term logs, resume is exact, NaN never reaches disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cdcl.checkpoint import load_checkpoint
from cdcl.cli import main
from cdcl.config import load_config
from cdcl.data import load_dataset
from cdcl.data.splits import Split, write_split
from cdcl.data.stain import StainNormalizer
from cdcl.data.synthetic import write_synthetic_dataset
from cdcl.errors import CdclError
from cdcl.inference.predictor import load_predictor, predict_instances
from cdcl.training.engine import Trainer, train

from helpers.training import tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method, terms",
    [
        ("supervised", {"sup"}),
        ("mean_teacher", {"sup", "cons"}),
        ("fixmatch", {"sup", "cons"}),
        ("cdcl", {"sup", "cons", "ent", "contr"}),
        ("unimatch", {"sup", "cons", "cons_fp"}),
    ],
)
def test_each_method_trains_and_logs_its_terms(tiny, tmp_path, method, terms):
    data, split = tiny
    summary = train(
        load_config(None, tiny_overrides(data, split, method, iterations=4, **{"method.threshold": 0.0})), tmp_path
    )
    assert summary["iterations"] == 4
    rows = [r for r in records(tmp_path) if "loss/total" in r]
    assert {f"loss/{t}" for t in terms} <= set(rows[-1]), rows[-1]  # after warm-up (2 iterations)
    assert "loss/cons" not in rows[0]  # warm-up: supervised only
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert any("val/dice" in r for r in records(tmp_path))
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "config.yaml").exists()
    predictor = load_predictor(tmp_path / "best.pt", "cpu")
    assert predictor.window == 64 and not predictor.model.training


def test_cdcl_contrastive_stats_are_logged(tiny, tmp_path):
    data, split = tiny
    # Two-class head: after 4 iterations a three-class head still calls every pixel nucleus (at initialisation
    # interior + boundary hold 2/3 of the probability), which leaves no negatives to contrast.
    sets = {"method.threshold": 0.0, "model.instances": "binary"}
    train(load_config(None, tiny_overrides(data, split, "cdcl", iterations=4, **sets)), tmp_path)
    last = [r for r in records(tmp_path) if "loss/contr" in r][-1]
    assert last["stat/n_anchors"] > 0 and last["stat/bank_size"] > 0
    assert last["loss/contr"] > 0


def test_a_log_window_across_the_end_of_warm_up_averages_each_term_over_its_own_steps(tiny, tmp_path):
    """Iterations 1-2 are warm-up (supervised only), so a window of iterations 1-3 holds one step of each
    unlabeled term: its logged value must be that step's, as logged with a window of one."""
    data, split = tiny
    logged = {}
    for every in (1, 3):
        run = tmp_path / f"every{every}"
        train(
            load_config(
                None,
                tiny_overrides(
                    data, split, "cdcl", iterations=3, **{"method.threshold": 0.0, "train.log_every": every}
                ),
            ),
            run,
        )
        logged[every] = next(r for r in records(run) if r["iteration"] == 3 and "loss/total" in r)
    for key in ("loss/cons", "loss/ent", "loss/contr", "stat/n_anchors"):
        assert logged[3][key] == pytest.approx(logged[1][key], rel=1e-6), key
    assert logged[3]["loss/sup"] != pytest.approx(logged[1]["loss/sup"])  # the mean of three steps


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["cdcl", "unimatch"])  # the methods that draw their own random numbers
def test_resume_reaches_the_same_weights(tiny, tmp_path, monkeypatch, method):
    data, split = tiny
    config = load_config(None, tiny_overrides(data, split, method, iterations=6, **{"method.threshold": 0.0}))
    train(config, tmp_path / "straight")

    original = Trainer._validate_and_save

    def crash_after_step_4(self):
        original(self)
        if self.step == 4:
            raise Interrupt

    monkeypatch.setattr(Trainer, "_validate_and_save", crash_after_step_4)
    with pytest.raises(Interrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "_validate_and_save", original)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 4
    train(config, tmp_path / "resumed")

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for which in ("student", "teacher"):
        for key, value in a["weights"][which].items():
            assert torch.equal(value, b["weights"][which][key]), f"{which}.{key} differs after resume"

    def losses(run):
        return [{k: v for k, v in r.items() if k.startswith(("loss/", "val/", "iteration"))} for r in records(run)]

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_nan_loss_stops_and_keeps_good_checkpoint(tiny, tmp_path, monkeypatch):
    data, split = tiny
    config = load_config(None, tiny_overrides(data, split, "supervised", iterations=6))
    from cdcl.methods.supervised import Supervised

    original = Supervised.losses

    def poisoned(self, student, teacher, labeled, unlabeled, step):
        terms = original(self, student, teacher, labeled, unlabeled, step)
        if step == 3:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(Supervised, "losses", poisoned)
    with pytest.raises(CdclError, match="non-finite loss at iteration 4"):
        train(config, tmp_path)
    good = load_checkpoint(tmp_path / "last.pt")
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["weights"]["student"].values() if v.is_floating_point())

    skip = load_config(None, tiny_overrides(data, split, "supervised", iterations=6, **{"train.on_nonfinite": "skip"}))
    summary = train(skip, tmp_path / "skip")
    assert summary["skipped_steps"] == 1 and summary["iterations"] == 6


def test_cli_bad_inputs_exit_2(tiny, tmp_path, capsys):
    data, split = tiny
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method:\n  nmae: cdcl\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown config key 'method.nmae'" in err[1]
    empty = tmp_path / "empty_split"
    empty.mkdir()
    (empty / "labeled.txt").write_text("")
    cfg.write_text("")
    args = ["train", "--config", str(cfg), "--out", str(tmp_path / "r2")]
    sets = [a for s in tiny_overrides(data, empty, "supervised") for a in ("--set", s)]
    assert main(args + sets) == 2
    assert "labeled split is empty" in capsys.readouterr().err
    (empty / "labeled.txt").write_text("no_such_item\n")
    assert main(args + sets) == 2
    assert "unknown item" in capsys.readouterr().err
    labeled = (split / "labeled.txt").read_text()
    (empty / "labeled.txt").write_text(labeled)
    (empty / "val.txt").write_text(labeled.splitlines()[0] + "\n")
    assert main(args + sets) == 2
    assert f"item '{labeled.splitlines()[0]}' is also trained on" in capsys.readouterr().err


def test_resume_refuses_other_architecture(tiny, tmp_path):
    data, split = tiny
    train(load_config(None, tiny_overrides(data, split, "supervised", iterations=2)), tmp_path)
    other = load_config(None, tiny_overrides(data, split, "supervised", iterations=4, **{"model.embed_dim": 4}))
    with pytest.raises(CdclError, match="different model configuration"):
        train(other, tmp_path)


@pytest.mark.parametrize("method", ["cdcl", "unimatch"])  # unimatch: its feature stream rides in the one DDP call
def test_ddp_two_processes_on_cpu(tiny, tmp_path, method):
    data, split = tiny
    sets = [
        a for s in tiny_overrides(data, split, method, iterations=3, **{"method.threshold": 0.0}) for a in ("--set", s)
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
            "-m",
            "cdcl.cli",
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "run"),
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["step"] == 3 and payload["complete"]


def test_ddp_skips_a_step_on_every_process_when_one_meets_a_nan(tiny, tmp_path):
    """Were only the process with the NaN to skip, the other's gradient all-reduce would wait for it forever."""
    data, split = tiny
    sets = [
        a
        for s in tiny_overrides(data, split, "supervised", iterations=4, **{"train.on_nonfinite": "skip"})
        for a in ("--set", s)
    ]
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import math, os, sys\n"
        "from cdcl.methods.supervised import Supervised\n"
        "from cdcl.cli import main\n"
        "losses = Supervised.losses\n"
        "def poisoned(self, *args):\n"
        "    terms = losses(self, *args)\n"
        "    if args[-1] == 1 and os.environ['RANK'] == '1':\n"
        "        terms['total'] = terms['total'] * math.nan\n"
        "    return terms\n"
        "Supervised.losses = poisoned\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29518",
            str(script),
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "run"),
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping iteration 2" in proc.stderr
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["step"] == 4 and payload["skipped"] == 1 and payload["complete"]


def test_stain_normalisation_is_fitted_on_the_labeled_images_stored_and_applied_at_prediction(
    tiny, tmp_path, monkeypatch
):
    data, split = tiny
    seen = []
    original = StainNormalizer.__call__
    monkeypatch.setattr(
        StainNormalizer, "__call__", lambda self, image: seen.append(image.shape) or original(self, image)
    )
    config = load_config(None, tiny_overrides(data, split, "cdcl", iterations=2, **{"data.stain_norm": "macenko"}))
    train(config, tmp_path)
    assert len(seen) >= 3 + 2 + 2  # each labeled and unlabeled image in a batch, and both val images
    stored = {name: load_checkpoint(tmp_path / name)["stain"] for name in ("last.pt", "best.pt")}
    assert stored["last.pt"] == stored["best.pt"] and stored["last.pt"]["method"] == "macenko"
    predictor = load_predictor(tmp_path / "best.pt", "cpu")
    assert predictor.stain.to_dict() == stored["best.pt"] and predictor.window_options()["stain"] is predictor.stain
    seen.clear()
    predict_instances(predictor, np.asarray(load_dataset(data, "folder")[0].image))
    assert seen == [(96, 96, 3)]


def test_each_checkpoint_carries_the_thresholds_tuned_for_its_own_weights(tiny, tmp_path):
    """... and the size of the nuclei those weights predict on val (what `--mpp auto` aims at), beside the
    labeled masks' nucleus size."""
    from cdcl.instances.postprocess import instances_from_maps, tune_params
    from cdcl.instances.sizes import nucleus_diameter
    from cdcl.training.engine import predict_probabilities

    data, split = tiny
    config = load_config(None, tiny_overrides(data, split, "supervised", **{"train.tune_postprocess": "true"}))
    trainer = Trainer(config, tmp_path)
    trainer.fit()
    gts = [it.instances for it in trainer.splits.val]
    for name in ("best.pt", "last.pt"):
        predictor = load_predictor(tmp_path / name, "cpu")
        probs = predict_probabilities(predictor.model, trainer.splits.val, config, trainer.device)
        params, _ = tune_params(probs, gts)
        stored = load_checkpoint(tmp_path / name)
        assert stored["postprocess"] == params.to_dict(), name
        size = nucleus_diameter(instances_from_maps(p, params) for p in probs)
        assert stored["predicted_nucleus_diameter"] == size, name
        assert stored["nucleus_diameter"] == nucleus_diameter(it.instances for it in trainer.splits.labeled) > 0
        assert predictor.nucleus_diameter == (size or stored["nucleus_diameter"])
    assert {"val/aji_tuned", "val/aji_tuned_last"} <= {k for r in records(tmp_path) for k in r}


def test_unlabeled_root_adds_every_image_of_another_folder_as_unlabeled(tiny, tmp_path):
    from cdcl.training.engine import load_splits

    data, split = tiny
    own = tmp_path / "own_split"
    names = load_dataset(data, "folder").names()
    write_split(Split(labeled=names[:3], unlabeled=[], val=names[8:10], test=[]), own)
    lab_tiles = tmp_path / "lab"
    write_synthetic_dataset(lab_tiles, 4, seed=7, size=96)  # annotated, but used as unlabeled: masks are dropped
    config = load_config(None, tiny_overrides(data, own, "cdcl", **{"data.unlabeled_root": lab_tiles}))
    splits = load_splits(config, needs_unlabeled=True)
    assert [it.name.split(":")[0] for it in splits.unlabeled] == ["unlabeled"] * 4
    assert not any(it.has_mask for it in splits.unlabeled) and len(splits.labeled) == 3
    missing = load_config(None, tiny_overrides(data, own, "cdcl", **{"data.unlabeled_root": tmp_path / "nope"}))
    with pytest.raises(CdclError, match="data.unlabeled_root"):
        load_splits(missing, needs_unlabeled=True)
