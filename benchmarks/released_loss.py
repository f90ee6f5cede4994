"""The computation of the authors' released ``ContrastiveLoss`` (github zzw-szu/CDCL, ``model/losses.py``),
rewritten here as the baseline that ``benchmarks/contrastive_exact.py`` times ``patch_contrastive_loss`` against.

What it does, step by step as released: one (N, M) logits matmul; a label mask and an FC mask, each (N, M+1)
float, with a column of ones for the positive; the positive logit concatenated in front of the logits; the row
maximum subtracted before ``exp``; the exponentials multiplied by both masks and summed; ``-log`` of the positive's
share, with ``eps`` in the denominator and inside the log. Two crashes of the release are fixed: the temperature is
an argument (the release read an unset attribute on some paths) and the bank is detached (the release kept the
graph of earlier iterations). It compares FC sums with ``<=`` and no slack, so inputs should avoid sums within
rounding of ``bdp + fdp``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def released_contrastive_loss(
    anchors: Tensor,
    positives: Tensor,
    bank: Tensor,
    anchor_labels: Tensor,
    bank_labels: Tensor,
    anchor_fc: Tensor,
    bank_fc: Tensor,
    *,
    temperature: float,
    bdp: float,
    fdp: float,
    eps: float = 1e-8,
) -> Tensor:
    """Per-anchor loss (N,) computed the released way (dense float masks, concatenated logits)."""
    bank = bank.detach()
    ones = anchors.new_ones(anchors.shape[0], 1)
    label_mask = torch.cat([ones, (anchor_labels[:, None] != bank_labels[None, :]).float()], dim=1)
    fc_mask = torch.cat([ones, ((anchor_fc[:, None] + bank_fc[None, :]) <= bdp + fdp).float()], dim=1)
    positive = (anchors * positives / temperature).sum(dim=-1, keepdim=True)
    logits = torch.cat([positive, anchors @ bank.T / temperature], dim=1)
    shift = logits.max(dim=1, keepdim=True).values
    denominator = ((logits - shift).exp() * label_mask * fc_mask).sum(dim=-1)
    share = (positive - shift).exp().squeeze(-1) / (denominator + eps)
    return -(share + eps).log()
