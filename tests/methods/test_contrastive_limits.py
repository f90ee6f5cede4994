"""Sampling sizes and bank capacity at their limits: documented fallbacks, not errors.

The number of anchor pixels and bank candidates changes every step with the pseudo-labels and the confidence
filter, so a config value cannot be checked against it up front: ``method.num_anchors`` or
``method.num_bank_samples`` above what a step holds take every pixel (exact mode, as ``<= 0`` does), and
``method.bank_capacity=0`` keeps the current iteration only (the same negatives as ``method.use_bank=false``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdcl.config import load_config
from cdcl.methods import build_method
from cdcl.methods.losses import MemoryBank, cross_patch_contrastive

SETTINGS = {"grid": 2, "bdp": 0.2, "fdp": 0.8, "temperature": 0.1}


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(2, 8, 6, 6, generator=g), dim=1)
    teacher = F.normalize(torch.randn(2, 8, 6, 6, generator=g), dim=1)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[:, :, 3:] = 1  # left half background, right half nucleus: every patch is an anchor patch
    labels[:, 0, 0] = 1  # one patch mixed, so some FC sums exceed the limit
    return student, teacher, labels


def _term(seed: int, bank: MemoryBank | None, anchors: int, samples: int) -> tuple[torch.Tensor, dict]:
    student, teacher, labels = _batch(seed)
    generator = torch.Generator().manual_seed(seed)
    return cross_patch_contrastive(
        student,
        teacher,
        labels,
        labels,
        None,
        bank,
        num_anchors=anchors,
        num_bank_samples=samples,
        generator=generator,
        **SETTINGS,
    )


def test_more_anchors_and_bank_samples_than_pixels_means_all_of_them() -> None:
    pixels = 2 * 6 * 6
    exact_bank, large_bank = MemoryBank(capacity=1), MemoryBank(capacity=1)
    for seed in range(3):
        exact, exact_stats = _term(seed, exact_bank, anchors=0, samples=0)
        large, large_stats = _term(seed, large_bank, anchors=10**9, samples=pixels + 1)
        assert large.item() == exact.item()
        assert {k: v.item() for k, v in large_stats.items()} == {k: v.item() for k, v in exact_stats.items()}
    assert exact_stats["n_anchors"].item() == pixels and exact_stats["bank_size"].item() == 2 * 2 * pixels


def test_bank_capacity_zero_keeps_the_current_iteration_only() -> None:
    bank = MemoryBank(capacity=0)
    for seed in range(3):
        kept, kept_stats = _term(seed, bank, anchors=16, samples=20)
        alone, alone_stats = _term(seed, None, anchors=16, samples=20)
        assert kept.item() == alone.item()
        assert kept_stats["bank_size"].item() == alone_stats["bank_size"].item() == 40
        assert len(bank) == 40


def test_config_accepts_the_limits() -> None:
    cfg = load_config(
        None,
        ["method.name=cdcl", "method.num_anchors=1000000000", "method.num_bank_samples=-1", "method.bank_capacity=0"],
    )
    method = build_method(cfg.method)
    assert method.bank is not None and method.bank.capacity == 0
