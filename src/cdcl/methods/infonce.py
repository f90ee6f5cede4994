"""The arithmetic behind ``losses.patch_contrastive_loss``: per-anchor InfoNCE against each anchor's own set of bank
negatives, without an (anchors x bank) mask and with a hand-written backward pass.

Why it is fast: among the bank entries of the other labels sorted by foreground ratio, the FC rule keeps a prefix,
so one anchor's negatives are a contiguous run of columns (``negative_blocks``); anchors of one label sorted by
their count share the columns of the first. The (n, k) logits of a block are then the only large tensor: made
by one matmul, turned into exponentials in place, and either kept for the backward pass or recomputed there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class NegativeBlock(NamedTuple):
    """Anchors ``rows`` whose negatives are the bank entries ``cols[:counts[r]]``; ``ragged``: counts differ from
    ``len(cols)`` somewhere, so the block needs a column mask."""

    rows: Tensor
    cols: Tensor
    counts: Tensor
    ragged: bool


def negative_blocks(
    anchor_labels: Tensor, bank_labels: Tensor, anchor_fc: Tensor, bank_fc: Tensor, fc_room: float, chunk_size: int
) -> list[NegativeBlock]:
    """Every anchor in exactly one block of at most ``chunk_size`` anchors of one label. Bank entry j is a negative
    of anchor i when ``bank_labels[j] != anchor_labels[i]`` and ``bank_fc[j] <= fc_room - anchor_fc[i]`` (in float32,
    the comparison the mask of the earlier code made)."""
    room = fc_room - anchor_fc.float()
    blocks = []
    for label in anchor_labels.unique().tolist():
        rows = (anchor_labels == label).nonzero().squeeze(1)
        others = (bank_labels != label).nonzero().squeeze(1)
        others_fc, order = bank_fc.float()[others].sort()
        counts, by_count = torch.searchsorted(others_fc, room[rows], right=True).sort(descending=True)
        rows, cols = rows[by_count], others[order]
        firsts = torch.arange(0, rows.shape[0], chunk_size, device=rows.device)
        lasts = (firsts + chunk_size - 1).clamp_max(rows.shape[0] - 1)
        for start, (first, last) in zip(firsts.tolist(), torch.stack([counts[firsts], counts[lasts]], 1).tolist()):
            stop = start + chunk_size
            blocks.append(NegativeBlock(rows[start:stop], cols[:first], counts[start:stop], last < first))
    return blocks


def _block_logits(scaled: Tensor, bank: Tensor, block: NegativeBlock) -> Tensor:
    """(n, k) logits of a block's anchors (already divided by the temperature) against its columns; -inf beyond
    each anchor's count."""
    logits = scaled[block.rows] @ bank[block.cols].T
    if block.ragged:
        columns = torch.arange(logits.shape[1], device=logits.device)
        logits.masked_fill_(columns >= block.counts[:, None], -math.inf)
    return logits


class InfoNCE(torch.autograd.Function):
    """``log(e^{p_i} + sum_{j in Neg(i)} e^{l_ij}) - p_i`` per anchor (N,), with ``p_i = a_i.pos_i / t`` and
    ``l_ij = a_i.b_j / t``; each block's exponentials are kept for the backward pass while the kept ones total at
    most ``budget`` elements, the rest are recomputed there. Subtracting ``max(p_i, max_j l_ij)`` first keeps the
    exponentials finite at any temperature, and makes an anchor without negatives score exactly 0."""

    @staticmethod
    def forward(ctx, anchors, positives, bank, blocks, temperature, budget):
        scaled = anchors / temperature
        positive = (scaled * positives).sum(dim=1)
        loss = positive.new_zeros(positive.shape)
        keep, saved = any(ctx.needs_input_grad[:3]), []
        for block in blocks:
            weights, pos = _block_logits(scaled, bank, block), positive[block.rows]
            shift = torch.maximum(weights.amax(dim=1), pos) if weights.shape[1] else pos
            weights.sub_(shift[:, None]).exp_()
            denominator = weights.sum(dim=1) + (pos - shift).exp()
            loss[block.rows] = denominator.log() + (shift - pos)
            keep = keep and budget >= weights.numel()
            budget -= weights.numel()
            saved.append([weights if keep else None, shift, denominator])
        ctx.save_for_backward(anchors, positives, bank)
        ctx.blocks, ctx.saved, ctx.temperature = blocks, saved, temperature
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        anchors, positives, bank = ctx.saved_tensors
        want_anchors, want_positives, want_bank = ctx.needs_input_grad[:3]
        scaled = anchors / ctx.temperature
        grad_scaled, grad_positives, grad_bank = torch.zeros_like(scaled), torch.zeros_like(positives), None
        if want_bank:
            grad_bank = torch.zeros_like(bank)
        with torch.autocast(device_type=grad.device.type, enabled=False):
            for block, kept in zip(ctx.blocks, ctx.saved):
                weights, shift, denominator = kept
                kept[0] = None  # used up in place below: a second backward recomputes it
                if weights is None:
                    weights = _block_logits(scaled, bank, block).sub_(shift[:, None]).exp_()
                rows_scaled, rows_positives = scaled[block.rows], positives[block.rows]
                per_anchor = grad[block.rows] / denominator
                weights.mul_(per_anchor[:, None])  # d loss / d l_ij
                positive = (rows_scaled * rows_positives).sum(dim=1)
                d_positive = per_anchor * (positive - shift).exp() - grad[block.rows]  # d loss / d p_i
                grad_scaled[block.rows] = weights @ bank[block.cols] + d_positive[:, None] * rows_positives
                grad_positives[block.rows] = d_positive[:, None] * rows_scaled
                if want_bank:
                    grad_bank.index_add_(0, block.cols, weights.T @ rows_scaled)
        return (
            grad_scaled / ctx.temperature if want_anchors else None,
            grad_positives if want_positives else None,
            grad_bank,
            None,
            None,
            None,
        )
