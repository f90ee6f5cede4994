"""Ramp-up, EMA rate, entropy and confident consistency losses (PAPER.md, "Losses" 3-4 and "Known defects")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdcl.methods.losses import confident_cross_entropy, ema_alpha, entropy_loss, sigmoid_rampup


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0
    assert sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))  # clipped at 0
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp


def test_sigmoid_rampup_is_increasing() -> None:
    values = [sigmoid_rampup(t, 7.0) for t in range(8)]
    assert all(0 < a < b for a, b in zip(values, values[1:]))


def test_ema_alpha() -> None:
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == pytest.approx(0.5)
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(10_000, 0.99) == 0.99


def test_entropy_uniform_is_log_2() -> None:
    assert entropy_loss(torch.zeros(2, 2, 3, 4)).item() == pytest.approx(math.log(2))


def test_entropy_of_a_confident_pixel_is_near_zero() -> None:
    logits = torch.tensor([30.0, -30.0]).reshape(1, 2, 1, 1)
    assert entropy_loss(logits).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_masked_mean() -> None:
    logits = torch.tensor([[30.0, 0.0], [-30.0, 0.0]]).reshape(1, 2, 1, 2)  # pixel 0 confident, pixel 1 uniform
    mask = torch.tensor([[[False, True]]])
    assert entropy_loss(logits, mask).item() == pytest.approx(math.log(2))


def test_entropy_empty_mask_is_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = entropy_loss(logits, torch.zeros(1, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def _teacher(max_probs: list[float]) -> torch.Tensor:
    """Teacher probabilities (1,2,1,K) whose class 1 has the given probabilities."""
    p1 = torch.tensor(max_probs)
    return torch.stack([1 - p1, p1]).reshape(1, 2, 1, -1)


def test_confident_cross_entropy_uses_only_confident_pixels() -> None:
    student = torch.tensor([[0.3, -1.0, 2.0], [0.1, 0.5, -0.4]]).reshape(1, 2, 1, 3).requires_grad_()
    teacher = _teacher([0.99, 0.6, 0.03])  # pixel 0 confident foreground, 1 unsure, 2 confident background
    loss, fraction = confident_cross_entropy(student, teacher, threshold=0.9)
    per_pixel = F.cross_entropy(student, torch.tensor([[[1, 1, 0]]]), reduction="none")[0, 0]
    assert loss.item() == pytest.approx((per_pixel[0] + per_pixel[2]).item() / 2)
    assert fraction.item() == pytest.approx(2 / 3)
    loss.backward()
    assert torch.equal(student.grad[..., 1], torch.zeros(1, 2, 1))  # the unconfident pixel is ignored
    assert student.grad[..., 0].abs().sum() > 0


def test_confident_cross_entropy_none_confident_is_zero() -> None:
    student = torch.randn(1, 2, 1, 3, requires_grad=True)
    loss, fraction = confident_cross_entropy(student, _teacher([0.5, 0.6, 0.4]), threshold=0.9)
    assert loss.item() == 0.0 and fraction.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_confident_cross_entropy_all_confident_equals_plain_cross_entropy() -> None:
    student = torch.randn(2, 2, 4, 4)
    teacher = torch.softmax(torch.randn(2, 2, 4, 4) * 50, dim=1)
    loss, fraction = confident_cross_entropy(student, teacher, threshold=0.0)
    assert torch.isfinite(loss)
    assert fraction.item() == 1.0
    assert loss.item() == pytest.approx(F.cross_entropy(student, teacher.argmax(1)).item(), rel=1e-6)
