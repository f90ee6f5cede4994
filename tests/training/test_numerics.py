"""Numerical faults: a NaN in a batch stops the run (or is skipped and counted), no checkpoint ever holds a
non-finite value, and degenerate unlabeled batches give 0 for the terms that have nothing to average, not NaN."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdcl.training.engine
from cdcl.checkpoint import load_checkpoint
from cdcl.config import MethodConfig, load_config
from cdcl.errors import CdclError
from cdcl.methods import build_method
from cdcl.methods.supervised import Supervised
from cdcl.training.engine import train

from helpers.cli_cases import TINY_ENCODER, Recorder
from helpers.training import tiny_dataset, tiny_overrides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def record(request) -> Recorder:
    return Recorder.for_test(request)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: several times faster for these tiny models on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(tiny, **extra):
    data, split = tiny
    return load_config(
        None,
        tiny_overrides(
            data,
            split,
            "supervised",
            iterations=4,
            **{"model.encoder": TINY_ENCODER, "method.warmup_iters": 0},
            **extra,
        ),
    )


def tensors(value, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint payload, with its key path."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensors(item, f"{where}[{i}]")


def finite_checkpoints(run: Path) -> dict[str, int]:
    """Step of every checkpoint in ``run``, each checked to hold only finite floats (weights, batch-norm
    statistics, optimiser state, CDCL's memory bank)."""
    steps = {}
    for path in sorted(run.glob("*.pt")):
        payload = load_checkpoint(path)
        for where, value in tensors(payload):
            assert not value.is_floating_point() or torch.isfinite(value).all(), f"{path.name}: {where} not finite"
        steps[path.name] = payload["step"]
    return steps


def poison_batch(monkeypatch, at_step: int, key: str = "image") -> None:
    """Iteration ``at_step + 1`` gets a NaN pixel in its ``key`` images (as a decoder bug or bad scaling would)."""
    original = cdcl.training.engine.stream_loader

    def stream_loader(dataset, batch_size, *, start_batch, **kw) -> Iterator:
        for step, batch in enumerate(original(dataset, batch_size, start_batch=start_batch, **kw), start=start_batch):
            if step == at_step and key in batch:
                batch[key] = batch[key].clone()
                batch[key][0, 0, 5, 5] = math.nan
            yield batch

    monkeypatch.setattr(cdcl.training.engine, "stream_loader", stream_loader)


def test_nan_in_a_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch, record):
    poison_batch(monkeypatch, at_step=3)
    with pytest.raises(
        CdclError, match=r"non-finite loss at iteration 4 \(total=nan, sup=nan\); stopped, last good checkpoint kept"
    ) as err:
        train(config(tiny), tmp_path)
    steps = finite_checkpoints(tmp_path)
    record(
        "train (in-process)",
        "NaN pixel in the labeled batch of iteration 4 (train.on_nonfinite=stop)",
        None,
        "stops with a clear message",
        message=str(err.value),
        outcome=f"stopped; checkpoints {steps}, all finite",
    )
    assert steps == {"best.pt": 2, "last.pt": 2}


@pytest.mark.parametrize("method, key", [("supervised", "image"), ("cdcl", "strong")])
def test_nan_in_a_batch_is_skipped_and_counted(tiny, tmp_path, monkeypatch, record, method, key):
    """With on_nonfinite=skip the step is dropped and counted, and leaves no trace: the forward pass that met
    the NaN had already updated the batch-norm statistics (and, for CDCL, pushed into the memory bank)."""
    poison_batch(monkeypatch, at_step=3, key=key)
    summary = train(
        config(tiny, **{"train.on_nonfinite": "skip", "method.name": method, "method.threshold": 0.0}), tmp_path
    )
    record(
        "train (in-process)",
        f"{method}: NaN pixel in the {key} batch of iteration 4 (train.on_nonfinite=skip)",
        None,
        "skips and counts the step",
        message=f"summary: skipped_steps={summary['skipped_steps']}, iterations={summary['iterations']}",
        outcome="step skipped and counted; batch-norm statistics"
        + (" and memory bank" if method == "cdcl" else "")
        + " restored; every checkpoint finite",
    )
    assert summary["skipped_steps"] == 1 and summary["iterations"] == 4
    assert finite_checkpoints(tmp_path) == {"best.pt": summary["best_step"], "last.pt": 4}
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["skipped"] == 1
    if method == "cdcl":
        assert len(last["method_state"]["bank"]["embeddings"]) > 0


def test_a_skipped_step_at_a_validation_boundary_still_validates_and_saves(tiny, tmp_path, monkeypatch):
    poison_batch(monkeypatch, at_step=1)  # iteration 2; train.val_every=2
    train(config(tiny, **{"train.on_nonfinite": "skip"}), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "val/dice" in r] == [2, 4]
    assert [r["iteration"] for r in rows if "loss/total" in r] == [1, 3, 4]  # nothing to average at 2


def test_too_many_skipped_steps_stop(tiny, tmp_path, monkeypatch, record):
    original = Supervised.losses

    def always_nan(self, *args):
        terms = original(self, *args)
        return {**terms, "total": terms["total"] * math.nan}

    monkeypatch.setattr(Supervised, "losses", always_nan)
    with pytest.raises(CdclError, match="non-finite loss at iteration 3") as err:
        train(config(tiny, **{"train.on_nonfinite": "skip", "train.max_skipped": 2}), tmp_path)
    record(
        "train (in-process)",
        "NaN loss at every step (train.on_nonfinite=skip, train.max_skipped=2)",
        None,
        "stops after 2 skips",
        message=str(err.value),
        outcome="stopped at the third; the checkpoints of iteration 2 (a validation step) hold the initial weights, "
        "finite",
    )
    assert finite_checkpoints(tmp_path) == {"best.pt": 2, "last.pt": 2}
    assert load_checkpoint(tmp_path / "last.pt")["skipped"] == 2


def test_non_finite_statistics_are_never_saved(tiny, tmp_path, monkeypatch, record):
    """A batch-norm running variance turned NaN (the loss stays finite: training uses batch statistics) must
    stop the save, not reach disk."""
    original = cdcl.training.engine.update_ema

    def poisoned_update(teacher, student, step, decay):
        if step == 3:
            bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var.fill_(math.nan)
        original(teacher, student, step, decay)

    monkeypatch.setattr(cdcl.training.engine, "update_ema", poisoned_update)
    with pytest.raises(CdclError, match="refusing to save .*: weights are not finite") as err:
        train(config(tiny), tmp_path)
    steps = finite_checkpoints(tmp_path)
    record(
        "train (in-process)",
        "a batch-norm running variance turned NaN after iteration 3 (loss still finite)",
        None,
        "never saved",
        message=str(err.value),
        outcome=f"stopped at the save; checkpoints {steps}, all finite",
    )
    assert steps == {"best.pt": 2, "last.pt": 2}


# ---- degenerate unlabeled batches: CDCL's terms with a model whose outputs the test controls -------------------


class Puppet(nn.Module):
    """Class-1 logit ``gain * (red - 0.5)`` per pixel, so the input picture *is* the prediction: 0 = confident
    background, 1 = confident nucleus, 0.5 = undecided. Embeddings at 1/4 resolution from a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(20.0))
        self.mix = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor, embeddings: bool = False) -> dict[str, torch.Tensor]:
        fg = self.gain * (x[:, :1] - 0.5)
        logits = torch.cat([-fg, fg], dim=1)
        out = {"logits": logits, "logits_lowres": F.avg_pool2d(logits, 4)}
        if embeddings:
            out["embeddings"] = F.normalize(self.mix(F.avg_pool2d(x, 4)), dim=1)
        return out


UNLABELED = {
    "background": "unlabeled batch that is all confident background",
    "stripes": "unlabeled batch with no anchor patch (every patch half nucleus)",
    "undecided": "unlabeled batch with no confident pseudo-label (p = 0.5 everywhere)",
}


def unlabeled_batch(kind: str) -> torch.Tensor:
    """2 x 3 x 64 x 64 pictures: all background, half-foreground stripes in every patch, or undecided grey."""
    x = torch.zeros(2, 3, 64, 64)
    if kind == "stripes":  # 8 px (2 embedding px) wide: every 4 x 4 patch of the 16 x 16 map is 50% nucleus
        x[..., :, (torch.arange(64) // 8) % 2 == 1] = 1.0
    elif kind == "undecided":
        x.fill_(0.5)
    return x


def cdcl_terms(kind: str) -> tuple[dict[str, torch.Tensor], Puppet]:
    torch.manual_seed(0)
    method = build_method(
        MethodConfig(name="cdcl", warmup_iters=0, ramp_iters=0, threshold=0.9, num_anchors=64, num_bank_samples=64)
    )
    student, teacher = Puppet(), Puppet()
    labeled = {"image": torch.rand(2, 3, 64, 64), "target": torch.randint(0, 2, (2, 64, 64))}
    weak = unlabeled_batch(kind)
    terms = method.losses(student, teacher, labeled, {"weak": weak, "strong": weak.clone()}, step=5)
    terms["total"].backward()
    return terms, student


@pytest.mark.parametrize(
    "kind, zero_terms, n_anchors",
    [
        ("background", ["contr"], 64),  # 512 anchor pixels (64 sampled), but none of another class: no negatives
        ("stripes", ["contr"], 0),  # every patch is half nucleus: no anchor patch at all
        ("undecided", ["cons", "contr"], 0),  # nothing confident: no pseudo-label, no anchor, no bank entry
    ],
)
def test_degenerate_unlabeled_batches_give_zero_not_nan(record, kind, zero_terms, n_anchors):
    terms, student = cdcl_terms(kind)
    values = ", ".join(
        f"{name}={terms[name].item():.4g}" for name in ("cons", "ent", "contr", "stat/n_anchors", "stat/n_negatives")
    )
    record(
        "CDCL.losses",
        UNLABELED[kind],
        None,
        " and ".join(zero_terms) + " = 0",
        message=values,
        outcome="finite terms and gradients",
    )
    for name, value in terms.items():
        assert torch.isfinite(value), f"{name} = {value}"
    for name in zero_terms:
        assert terms[name].item() == 0.0, f"{name} = {terms[name]}"
    assert terms["stat/n_anchors"].item() == n_anchors
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    if kind == "background":
        assert terms["stat/n_negatives"].item() == 0.0 and terms["cons"].item() < 1e-6
    if kind == "undecided":
        assert terms["stat/confident"].item() == 0.0 and terms["stat/bank_size"].item() == 0.0
