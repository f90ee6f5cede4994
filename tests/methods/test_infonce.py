"""The blocked InfoNCE behind ``patch_contrastive_loss``: cases the naive-reference tests do not reach (more than
two labels, a second backward through the kept exponentials, gradients to every input with ragged blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdcl.methods.infonce import negative_blocks
from cdcl.methods.losses import FC_TOLERANCE, count_negatives, patch_contrastive_loss
from cdcl.testing.contrastive import naive_patch_contrastive_loss

HYPER = {"temperature": 0.2, "bdp": 0.2, "fdp": 0.8}


def _inputs(n: int, m: int, d: int, labels: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n + m + labels)
    return {
        "anchors": F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
        "positives": F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
        "bank": F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1),
        "anchor_labels": torch.randint(0, labels, (n,), generator=g),
        "bank_labels": torch.randint(0, labels, (m,), generator=g),
        "anchor_fc": torch.randint(0, 9, (n,), generator=g).float() / 8,
        "bank_fc": torch.randint(0, 9, (m,), generator=g).float() / 8,
    }


def _counts_by_row(blocks) -> list[int]:
    by_row = {row: count for b in blocks for row, count in zip(b.rows.tolist(), b.counts.tolist())}
    return [by_row[row] for row in sorted(by_row)]


def test_three_labels_match_the_naive_reference() -> None:
    data = _inputs(37, 90, 8, labels=3)
    got = patch_contrastive_loss(**data, **HYPER, chunk_size=5)
    want = torch.tensor(naive_patch_contrastive_loss(**data, **HYPER), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_blocks_hold_each_anchor_once_with_exactly_its_negatives() -> None:
    data = _inputs(23, 40, 4, labels=3)
    labels, bank_labels, fc, bank_fc = (data[k] for k in ("anchor_labels", "bank_labels", "anchor_fc", "bank_fc"))
    blocks = negative_blocks(labels, bank_labels, fc, bank_fc, 1.0 + FC_TOLERANCE, chunk_size=4)
    assert sorted(torch.cat([b.rows for b in blocks]).tolist()) == list(range(23))
    for block in blocks:
        assert block.rows.shape[0] <= 4
        for row, count in zip(block.rows.tolist(), block.counts.tolist()):
            want = (bank_labels != labels[row]) & (bank_fc <= 1.0 + FC_TOLERANCE - fc[row])
            assert sorted(block.cols[:count].tolist()) == want.nonzero().squeeze(1).tolist()
    counts = count_negatives(labels, bank_labels, fc, bank_fc, bdp=0.2, fdp=0.8)
    assert counts.tolist() == _counts_by_row(blocks)


def test_gradients_to_every_input_with_three_labels_and_ragged_blocks() -> None:
    data = _inputs(9, 14, 3, labels=3, dtype=torch.float64)
    differentiable = ("anchors", "positives", "bank")
    rest = {k: v for k, v in data.items() if k not in differentiable}

    def loss(anchors, positives, bank):
        return patch_contrastive_loss(anchors, positives, bank, **rest, **HYPER, chunk_size=2)

    inputs = tuple(data[k].clone().requires_grad_() for k in differentiable)
    assert torch.autograd.gradcheck(loss, inputs)


def test_second_backward_recomputes_the_used_exponentials() -> None:
    data = _inputs(20, 30, 4, labels=2)
    anchors = data.pop("anchors").requires_grad_()
    loss = patch_contrastive_loss(anchors, **data, **HYPER).sum()
    loss.backward(retain_graph=True)
    once = anchors.grad.clone()
    loss.backward()
    torch.testing.assert_close(anchors.grad, 2 * once)
