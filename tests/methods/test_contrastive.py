"""Cross-patch dense contrastive loss: exactness against a naive loop, empty cases, stability, bank, sampling."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from cdcl.methods.losses import (
    MemoryBank,
    count_negatives,
    cross_patch_contrastive,
    patch_contrastive_loss,
    patch_foreground_ratio,
    sample_anchor_pixels,
)
from cdcl.testing.contrastive import naive_patch_contrastive_loss

BDP, FDP = 0.2, 0.8
FC_VALUES = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.5, 0.75, 0.8, 0.9, 1.0])  # thresholds and their neighbours


def _inputs(n: int, m: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "anchors": F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
        "positives": F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
        "bank": F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1),
        "anchor_labels": torch.randint(0, 2, (n,), generator=g),
        "bank_labels": torch.randint(0, 2, (m,), generator=g),
        "anchor_fc": FC_VALUES[torch.randint(0, len(FC_VALUES), (n,), generator=g)],
        "bank_fc": FC_VALUES[torch.randint(0, len(FC_VALUES), (m,), generator=g)],
    }


@pytest.mark.parametrize(
    ("n", "m", "d", "chunk", "temperature"),
    [
        (1, 1, 4, 1, 0.1),
        (7, 13, 8, 3, 0.1),
        (40, 120, 16, 16, 0.5),
        (65, 90, 32, 64, 0.07),
        (20, 50, 8, 1024, 1.0),
    ],
)
def test_matches_naive_reference(n: int, m: int, d: int, chunk: int, temperature: float) -> None:
    data = _inputs(n, m, d, seed=n * 1000 + m)
    got = patch_contrastive_loss(**data, temperature=temperature, bdp=BDP, fdp=FDP, chunk_size=chunk)
    want = naive_patch_contrastive_loss(**data, temperature=temperature, bdp=BDP, fdp=FDP)
    assert got.shape == (n,)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_matches_naive_reference_at_low_temperature_in_float64() -> None:
    data = _inputs(30, 200, 16, seed=3, dtype=torch.float64)
    got = patch_contrastive_loss(**data, temperature=0.01, bdp=BDP, fdp=FDP, chunk_size=7)
    want = naive_patch_contrastive_loss(**data, temperature=0.01, bdp=BDP, fdp=FDP)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def _one_anchor(anchor_fc: float, bank_fc: float, bank_label: int, bdp: float = BDP, fdp: float = FDP) -> torch.Tensor:
    """Anchor (label 1) with a.p = 0.6 and one bank entry with a.b = 0.8, at temperature 0.1."""
    return patch_contrastive_loss(
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([[0.6, 0.8]]),
        torch.tensor([[0.8, 0.6]]),
        torch.tensor([1]),
        torch.tensor([bank_label]),
        torch.tensor([anchor_fc], dtype=torch.float32),
        torch.tensor([bank_fc], dtype=torch.float32),
        temperature=0.1,
        bdp=bdp,
        fdp=fdp,
    )


def test_fc_sum_exactly_at_the_limit_counts_as_negative() -> None:
    expected = math.log(1 + math.exp((0.8 - 0.6) / 0.1))
    assert _one_anchor(0.2, 0.8, bank_label=0).item() == pytest.approx(expected, rel=1e-6)
    assert _one_anchor(0.9, 0.1, bank_label=0).item() == pytest.approx(expected, rel=1e-6)
    assert _one_anchor(0.3, 0.6, bank_label=0, bdp=0.3, fdp=0.6).item() == pytest.approx(expected, rel=1e-6)
    assert _one_anchor(0.3, 0.8, bank_label=0).item() == 0.0  # FC sum above bdp + fdp
    assert _one_anchor(0.2, 0.8, bank_label=1).item() == 0.0  # same label


def test_anchor_without_valid_negative_is_exactly_zero() -> None:
    data = _inputs(12, 30, 8, seed=5)
    data["bank_labels"] = torch.ones(30, dtype=torch.long)
    data["anchor_labels"] = torch.tensor([1] * 6 + [0] * 6)
    loss = patch_contrastive_loss(**data, temperature=0.1, bdp=BDP, fdp=FDP, chunk_size=5)
    assert torch.equal(loss[:6], torch.zeros(6))
    assert (loss[6:] > 0).any()


def test_no_anchor_gives_empty_loss() -> None:
    data = _inputs(0, 30, 8, seed=6)
    loss = patch_contrastive_loss(**data, temperature=0.1, bdp=BDP, fdp=FDP)
    assert loss.shape == (0,)


@pytest.mark.parametrize("bank", [torch.zeros(0, 8), torch.zeros(0, 0)])
def test_empty_bank_gives_zeros(bank: torch.Tensor) -> None:
    data = _inputs(5, 0, 8, seed=7)
    data["bank"] = bank
    data["anchors"].requires_grad_()
    loss = patch_contrastive_loss(**data, temperature=0.1, bdp=BDP, fdp=FDP, chunk_size=2)
    assert torch.equal(loss, torch.zeros(5))
    loss.sum().backward()
    assert torch.equal(data["anchors"].grad, torch.zeros(5, 8))


def test_stable_with_huge_logits() -> None:
    # a.p / t = 1000 and a.b / t = 1000 + log 3: naive exp overflows, the answer is log(1 + 3) = log 4
    anchors = torch.tensor([[10.0, 0.0]], requires_grad=True)
    positives = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0 + 0.01 * math.log(3) / 10.0, 0.0], [-1.0, 0.0]])
    loss = patch_contrastive_loss(
        anchors,
        positives,
        bank,
        torch.tensor([1]),
        torch.tensor([0, 0]),
        torch.tensor([0.0]),
        torch.tensor([0.0, 0.0]),
        temperature=0.01,
        bdp=BDP,
        fdp=FDP,
    )
    assert loss.item() == pytest.approx(math.log(4), rel=1e-3)
    loss.sum().backward()
    assert torch.isfinite(anchors.grad).all()


def test_random_inputs_at_temperature_001_stay_finite() -> None:
    data = _inputs(64, 500, 16, seed=8)
    data["anchors"] = (data["anchors"] * 5).requires_grad_()  # not normalised: logits up to ~500
    loss = patch_contrastive_loss(**data, temperature=0.01, bdp=BDP, fdp=FDP, chunk_size=16)
    assert torch.isfinite(loss).all()
    loss.mean().backward()
    assert torch.isfinite(data["anchors"].grad).all()


def test_gradients_are_exact_with_chunk_recomputation() -> None:
    data = _inputs(6, 9, 4, seed=9, dtype=torch.float64)
    data["bank_labels"][:4] = 1 - data["bank_labels"][:4]
    differentiable = ("anchors", "positives", "bank")

    def loss(anchors, positives, bank):
        rest = {k: v for k, v in data.items() if k not in differentiable}
        return patch_contrastive_loss(anchors, positives, bank, **rest, temperature=0.2, bdp=BDP, fdp=FDP, chunk_size=4)

    inputs = tuple(data[k].clone().requires_grad_() for k in differentiable)
    assert torch.autograd.gradcheck(loss, inputs)


def test_chunking_does_not_change_values_or_gradients() -> None:
    data = _inputs(50, 80, 8, seed=10)
    results = []
    for chunk in (7, 1024):
        anchors = data["anchors"].clone().requires_grad_()
        loss = patch_contrastive_loss(
            anchors, *[data[k] for k in list(data)[1:]], temperature=0.1, bdp=BDP, fdp=FDP, chunk_size=chunk
        )
        loss.sum().backward()
        results.append((loss.detach(), anchors.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_autocast_keeps_float32() -> None:
    data = _inputs(10, 40, 8, seed=11)
    plain = patch_contrastive_loss(**data, temperature=0.1, bdp=BDP, fdp=FDP)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = patch_contrastive_loss(**data, temperature=0.1, bdp=BDP, fdp=FDP)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


def test_count_negatives() -> None:
    counts = count_negatives(
        torch.tensor([1, 0, 1]),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0.9, 0.1, 0.2]),
        torch.tensor([0.1, 0.2, 0.8, 0.95]),
        bdp=BDP,
        fdp=FDP,
        chunk_size=2,
    )
    assert counts.tolist() == [1, 1, 2]


# --- patch foreground ratio -------------------------------------------------------------------------------------


def test_patch_foreground_ratio_divisible() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [1, 1, 0, 1]]])
    want = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0.75, 0.75, 0.25, 0.25], [0.75, 0.75, 0.25, 0.25]]])
    torch.testing.assert_close(patch_foreground_ratio(labels, 2), want)
    torch.testing.assert_close(patch_foreground_ratio(labels, 1), torch.full((1, 4, 4), 8 / 16))
    torch.testing.assert_close(patch_foreground_ratio(labels, 4), labels.float())


def test_patch_foreground_ratio_with_remainder_splits_evenly() -> None:
    labels = torch.tensor([[[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]])
    # columns 0-2 | 3-4, rows 0-1 | 2-3
    want = torch.tensor([[[2 / 6] * 3 + [1.0] * 2] * 2 + [[0.5] * 5] * 2])
    torch.testing.assert_close(patch_foreground_ratio(labels, 2), want)
    with pytest.raises(ValueError, match="grid"):
        patch_foreground_ratio(labels, 0)


# --- memory bank ------------------------------------------------------------------------------------------------


def _block(value: float, k: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.full((k, 2), value), torch.full((k,), int(value)), torch.full((k,), value / 10)


def test_memory_bank_fifo_capacity() -> None:
    bank = MemoryBank(capacity=1)
    assert len(bank) == 0 and bank.tensors()[0].shape[0] == 0
    for value in (1.0, 2.0, 3.0):
        embeddings, labels, fc = _block(value)
        bank.push(embeddings.requires_grad_() * 1.0, labels, fc)
    embeddings, labels, fc = bank.tensors()
    assert len(bank) == 6
    assert not embeddings.requires_grad  # stored detached
    assert embeddings[:, 0].tolist() == [2.0] * 3 + [3.0] * 3
    assert labels.tolist() == [2] * 3 + [3] * 3
    torch.testing.assert_close(fc, torch.tensor([0.2] * 3 + [0.3] * 3))

    current_only = MemoryBank(capacity=0)
    current_only.push(*_block(1.0))
    current_only.push(*_block(2.0, k=2))
    assert current_only.tensors()[0].tolist() == [[2.0, 2.0]] * 2


def test_memory_bank_rejects_bad_shapes() -> None:
    bank = MemoryBank(capacity=2)
    bank.push(*_block(1.0))
    with pytest.raises(ValueError, match="2-d"):
        bank.push(torch.zeros(3, 5), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="push needs"):
        bank.push(torch.zeros(3, 2), torch.zeros(4), torch.zeros(3))


def test_memory_bank_state_dict_round_trip() -> None:
    bank = MemoryBank(capacity=2)
    for value in (1.0, 2.0, 3.0, 4.0):
        bank.push(*_block(value))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = MemoryBank(capacity=2)
    restored.load_state_dict(state)
    for got, want in zip(restored.tensors(), bank.tensors()):
        assert torch.equal(got, want)
    smaller = MemoryBank(capacity=0)
    smaller.load_state_dict(state)
    assert smaller.tensors()[0][:, 0].tolist() == [4.0] * 3


# --- sampling ---------------------------------------------------------------------------------------------------


def test_sample_anchor_pixels() -> None:
    valid = torch.tensor([True, False, True, True, False, True, True])
    assert sample_anchor_pixels(valid, 0, None).tolist() == [0, 2, 3, 5, 6]
    assert sample_anchor_pixels(valid, 10, None).tolist() == [0, 2, 3, 5, 6]
    picked = sample_anchor_pixels(valid, 3, torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 3 and set(picked.tolist()) <= {0, 2, 3, 5, 6}
    again = sample_anchor_pixels(valid, 3, torch.Generator().manual_seed(0))
    assert torch.equal(picked, again)
    assert sample_anchor_pixels(torch.zeros(4, dtype=torch.bool), 2, None).shape == (0,)


def test_sample_anchor_pixels_is_uniform() -> None:
    valid = torch.tensor([False, True, True, False, True, True])
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(6)
    for _ in range(2000):
        counts[sample_anchor_pixels(valid, 2, generator)] += 1
    assert counts[[0, 3]].sum() == 0
    assert ((counts[[1, 2, 4, 5]] - 1000).abs() < 100).all()  # each valid pixel is picked with probability 1/2


# --- the assembled term -----------------------------------------------------------------------------------------

# 4x4 map, 2x2 patches: top-left all background (FC 0), top-right all foreground (FC 1),
# bottom-left FC 0.5 and bottom-right FC 0.25: only the top half are anchor pixels with bdp 0.2, fdp 0.8.
LABELS = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [1, 0, 0, 1]]])
TOP_HALF = torch.arange(8)


def _embeddings(seed: int, b: int = 1, d: int = 8, h: int = 4, w: int = 4) -> torch.Tensor:
    return F.normalize(torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed)), dim=1)


def _flat(emb: torch.Tensor) -> torch.Tensor:
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])


def _term(student, teacher, student_labels=LABELS, teacher_labels=LABELS, valid=None, bank=None, **options):
    settings = {"grid": 2, "bdp": BDP, "fdp": FDP, "temperature": 0.1, "num_anchors": 0, "num_bank_samples": 0}
    return cross_patch_contrastive(
        student, teacher, student_labels, teacher_labels, valid, bank, **(settings | options)
    )


def test_term_equals_the_formula_on_a_hand_made_batch() -> None:
    student, teacher = _embeddings(0, b=2), _embeddings(1, b=2)
    student_labels = torch.cat([LABELS, LABELS.flip(1)])  # image 1: the anchor patches are its bottom half
    teacher_labels = student_labels.clone()
    teacher_labels[0, 3, 3] = 0  # teacher's bottom-right patch of image 0: FC 0
    loss, stats = _term(student, teacher, student_labels, teacher_labels)

    anchors = torch.cat([TOP_HALF, 16 + 8 + TOP_HALF])
    fc_s = patch_foreground_ratio(student_labels, 2).reshape(-1)
    fc_t = patch_foreground_ratio(teacher_labels, 2).reshape(-1)
    want = naive_patch_contrastive_loss(
        _flat(student)[anchors],
        _flat(teacher)[anchors],
        torch.cat([_flat(student), _flat(teacher)]),
        student_labels.reshape(-1)[anchors],
        torch.cat([student_labels.reshape(-1), teacher_labels.reshape(-1)]),
        fc_s[anchors],
        torch.cat([fc_s, fc_t]),
        temperature=0.1,
        bdp=BDP,
        fdp=FDP,
    )
    assert loss.item() == pytest.approx(sum(want) / len(want), rel=1e-5)
    assert stats["n_anchors"].item() == 16
    assert stats["bank_size"].item() == 64


def test_patch_filter_and_valid_mask_select_anchor_pixels() -> None:
    student, teacher = _embeddings(0), _embeddings(1)
    assert _term(student, teacher)[1]["n_anchors"].item() == 8
    assert _term(student, teacher, patch_filter=False)[1]["n_anchors"].item() == 16
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, 0] = valid[0, 3, 3] = False
    _, stats = _term(student, teacher, valid=valid)
    assert stats["n_anchors"].item() == 7  # (3,3) is no anchor anyway
    assert stats["bank_size"].item() == 28
    # teacher labels make the bottom-right patch background-dominant too
    teacher_labels = LABELS.clone()
    teacher_labels[0, 3, 3] = 0
    assert _term(student, teacher, teacher_labels=teacher_labels, anchor_source="teacher")[1]["n_anchors"] == 12
    assert _term(student, teacher, teacher_labels=teacher_labels)[1]["n_anchors"] == 8


def test_patch_ratio_at_the_threshold_is_an_anchor_patch() -> None:
    labels = torch.zeros(1, 5, 5, dtype=torch.long)
    labels[0, 0] = 1  # FC = 5/25 = 0.2 (0.2000000030 in float32) with a single patch
    _, stats = _term(_embeddings(0, h=5, w=5), _embeddings(1, h=5, w=5), labels, labels, grid=1)
    assert stats["n_anchors"].item() == 25


def test_negative_counts_with_and_without_patch_filter() -> None:
    student, teacher = _embeddings(0), _embeddings(1)
    # the bank holds both views: 14 foreground and 18 background pixels
    # filtered: background anchors (FC 0) see all 14 foreground pixels (FC sum <= 1); foreground anchors (FC 1)
    # see only background pixels of FC-0 patches: the top-left patch of both views, 8 pixels
    assert _term(student, teacher)[1]["n_negatives"].item() == pytest.approx((4 * 14 + 4 * 8) / 8)
    # no filter: all 9 background anchors see 14 negatives, all 7 foreground anchors see 18
    assert _term(student, teacher, patch_filter=False)[1]["n_negatives"].item() == pytest.approx((9 * 14 + 7 * 18) / 16)


def test_no_anchor_patch_gives_zero_and_backward_works() -> None:
    labels = torch.tensor([[[0, 1], [1, 0]]])  # one patch, FC 0.5: no anchor
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    loss, stats = _term(student, torch.randn(1, 4, 2, 2), labels, labels, grid=1)
    assert loss.item() == 0.0 and stats["n_anchors"].item() == 0 and stats["n_negatives"].item() == 0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_sampling_mode_limits_counts() -> None:
    student, teacher = _embeddings(0, b=2, h=8, w=8), _embeddings(1, b=2, h=8, w=8)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    loss, stats = _term(
        student, teacher, labels, labels, num_anchors=10, num_bank_samples=7, generator=torch.Generator().manual_seed(0)
    )
    assert stats["n_anchors"].item() == 10 and stats["bank_size"].item() == 14
    assert torch.isfinite(loss) and loss.item() > 0


def test_two_iterations_backward_with_memory_bank() -> None:
    """The release kept graph-attached embeddings in the bank: the second backward failed."""
    torch.manual_seed(0)
    projector = torch.nn.Conv2d(3, 8, 1)
    bank = MemoryBank(capacity=2)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[:, :2] = 1
    for step in range(3):
        images = torch.randn(2, 3, 4, 4)
        student = F.normalize(projector(images), dim=1)
        with torch.no_grad():
            teacher = F.normalize(projector(images + 0.1), dim=1)
        loss, stats = _term(student, teacher, labels, labels, bank=bank)
        projector.zero_grad()
        loss.backward()
        assert projector.weight.grad.abs().sum() > 0
        assert stats["bank_size"].item() == 64 * min(step + 1, 3)
    assert not any(t.requires_grad for t in bank.tensors())


def test_teacher_gets_no_gradient() -> None:
    student = _embeddings(0).requires_grad_()
    teacher = _embeddings(1).requires_grad_()
    loss, _ = _term(student, teacher)
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bad_anchor_source() -> None:
    with pytest.raises(ValueError, match="anchor_source"):
        _term(_embeddings(0), _embeddings(1), anchor_source="both")
