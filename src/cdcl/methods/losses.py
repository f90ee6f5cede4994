"""Loss terms of CDCL and its baselines: ramp-up, EMA rate, entropy, confident consistency, and the cross-patch
dense contrastive loss with its memory bank (PAPER.md, "Losses").

Tensors in, tensors out: nothing here knows a model, a data set or a config. No function calls ``.item()``; the
only host synchronisations are the ones variable sizes need: the number of sampled pixels (``nonzero``) and, in
the contrastive loss, the anchors and negatives of each label (``cdcl.methods.infonce.negative_blocks``).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor

from cdcl.methods.infonce import InfoNCE, negative_blocks
from cdcl.vocab import ANCHOR_SOURCES, spoken

FC_TOLERANCE = 1e-6
"""Slack in every foreground-ratio comparison: ratios are float32 and thresholds Python floats, so a sum exactly
at the limit can round to either side (with bdp 0.3 and fdp 0.6, ``0.3 + 0.6 <= 0.9`` fails without it)."""


def sigmoid_rampup(t: float, length: float) -> float:
    """Consistency weight ramp ``exp(-5 (1 - t/T)^2)`` (Laine & Aila), so noisy early pseudo-labels weigh little.

    ``t`` is clipped to ``[0, length]``; a non-positive ``length`` means no ramp (weight 1).
    """
    if length <= 0 or t >= length:
        return 1.0
    phase = 1.0 - max(t, 0.0) / length
    return math.exp(-5.0 * phase * phase)


def ema_alpha(step: int, decay: float) -> float:
    """EMA rate of the teacher after ``step`` optimiser steps: ``min(1 - 1/(step+1), decay)``.

    Early on the teacher follows the student closely (alpha 0 at step 0 copies it) instead of averaging in the
    random initial weights.
    """
    return min(1.0 - 1.0 / (step + 1), decay)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 (still attached to the graph) when the mask is empty, never NaN."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def entropy_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean per-pixel entropy of ``softmax(logits)`` over the class dim 1; ``logits`` (B,C,H,W), ``mask`` (B,H,W).

    Minimising it pushes unlabeled predictions away from the decision boundary (PAPER.md, loss 4).
    """
    log_p = F.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return _masked_mean(entropy, mask)


def confident_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the student against the teacher's argmax where the teacher is confident.

    ``student_logits`` and ``teacher_probs`` are (B,C,H,W). Only pixels with ``max teacher prob > threshold``
    count (the intended mask; the release inverted it). The loss is averaged over the confident pixels, so its
    scale does not shrink with the confident fraction; with no confident pixel it is 0 with the graph intact.
    Returns ``(loss, confident_fraction)``.
    """
    confidence, target = teacher_probs.detach().max(dim=1)
    confident = confidence > threshold
    per_pixel = F.cross_entropy(student_logits, target, reduction="none")
    return _masked_mean(per_pixel, confident), confident.float().mean()


def _part_sums(counts: Tensor, dim: int, grid: int) -> tuple[Tensor, Tensor]:
    """Sums of integer ``counts`` over ``grid`` contiguous parts of ``dim`` (exact and deterministic: differences
    of a cumulative sum), and the part index of each position, ``floor(r * grid / size)``."""
    size = counts.shape[dim]
    bounds = torch.tensor([(i * size + grid - 1) // grid for i in range(grid + 1)], device=counts.device)
    cumulative = F.pad(counts.cumsum(dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
    sums = cumulative.index_select(dim, bounds[1:]) - cumulative.index_select(dim, bounds[:-1])
    return sums, torch.arange(size, device=counts.device) * grid // size


def _patch_sums(counts: Tensor, grid: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, grid, grid) sums of (B,H,W) integer ``counts`` per patch, and the patch row / column of each row / column."""
    row_sums, row_part = _part_sums(counts, -2, grid)
    sums, col_part = _part_sums(row_sums, -1, grid)
    return sums, row_part, col_part


def patch_foreground_ratio(labels: Tensor, grid: int) -> Tensor:
    """Per-pixel foreground ratio FC of the pixel's patch; ``labels`` (B,H,W) with foreground = 1.

    The map is cut into ``grid x grid`` patches. When H or W is not divisible by ``grid`` the patches are as
    even as possible (row r goes to patch row ``floor(r * grid / H)``, sizes differ by at most one pixel), so no
    crop size is rejected. Labels 1 and above count as foreground (a nucleus boundary given its own label 2 is
    still nucleus); 0 and negative labels do not. Returns float32 (B,H,W).
    """
    if grid < 1:
        raise ValueError(f"patch grid must be >= 1, got {grid}")
    foreground, row_part, col_part = _patch_sums((labels >= 1).long(), grid)
    sizes, _, _ = _patch_sums(torch.ones_like(labels[:1], dtype=torch.long), grid)
    ratio = foreground.float() / sizes.clamp_min(1).float()
    return ratio[:, row_part][:, :, col_part]


def patch_contrastive_loss(
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
    chunk_size: int = 1024,
) -> Tensor:
    """Per-anchor cross-patch InfoNCE loss (N,) of PAPER.md:

    ``-log( e^{a_i.p_i/t} / (e^{a_i.p_i/t} + sum_{j in Neg(i)} e^{a_i.b_j/t}) )`` with
    ``Neg(i) = {j : bank_labels[j] != anchor_labels[i] and anchor_fc[i] + bank_fc[j] <= bdp + fdp}``
    (the comparison has a slack of ``FC_TOLERANCE``). The positive always counts in the denominator, so an
    anchor without negatives scores exactly 0. Embeddings are used as given: they are expected L2-normalised and
    are not renormalised here.

    Shapes: anchors, positives (N,D); bank (M,D); labels (N,), (M,) integers; fc (N,), (M,) floats. Work is
    done in float32 (float64 inputs stay float64) whatever the autocast state, in blocks of at most
    ``chunk_size`` anchors of one label against only the bank columns they need (``cdcl.methods.infonce``).
    A block's exponentials are kept for the backward pass while all kept ones fit in ``chunk_size * M``
    elements and are recomputed there otherwise, so memory stays O(chunk_size * M) in both passes. Gradients
    reach every input that requires them (normally only ``anchors``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    bank = bank.reshape(-1, anchors.shape[1]) if bank.numel() else bank.new_zeros(0, anchors.shape[1])
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    blocks = negative_blocks(anchor_labels, bank_labels, anchor_fc, bank_fc, bdp + fdp + FC_TOLERANCE, chunk_size)
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        return InfoNCE.apply(
            anchors.to(dtype), positives.to(dtype), bank.to(dtype), blocks, temperature, chunk_size * bank.shape[0]
        )


@torch.no_grad()
def count_negatives(
    anchor_labels: Tensor,
    bank_labels: Tensor,
    anchor_fc: Tensor,
    bank_fc: Tensor,
    *,
    bdp: float,
    fdp: float,
    chunk_size: int = 1024,
) -> Tensor:
    """Number of negatives (N,) of each anchor under ``patch_contrastive_loss``'s rule, for logging."""
    counts = anchor_labels.new_zeros(anchor_labels.shape, dtype=torch.long)
    for block in negative_blocks(anchor_labels, bank_labels, anchor_fc, bank_fc, bdp + fdp + FC_TOLERANCE, chunk_size):
        counts[block.rows] = block.counts
    return counts


class MemoryBank:
    """Cross-image memory of detached embeddings with their pseudo-labels and patch FC (FIFO of pushes).

    Push once per iteration: the bank then holds this iteration's entries plus those of the ``capacity`` earlier
    iterations (``capacity`` 0: the current iteration only). Entries are detached on push, so a later backward
    never reaches an earlier iteration's graph (the release's "backward through the graph a second time" bug).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"memory bank capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._blocks: deque[tuple[Tensor, Tensor, Tensor]] = deque(maxlen=capacity + 1)

    def push(self, embeddings: Tensor, labels: Tensor, fc: Tensor) -> None:
        """Add one iteration's entries: embeddings (K,D), labels (K,), fc (K,); drops the oldest block if full."""
        if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1] or fc.shape != embeddings.shape[:1]:
            raise ValueError(
                f"memory bank push needs (K,D), (K,), (K,); got {tuple(embeddings.shape)}, "
                f"{tuple(labels.shape)}, {tuple(fc.shape)}"
            )
        if self._blocks and self._blocks[-1][0].shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"memory bank holds {self._blocks[-1][0].shape[1]}-d embeddings, got {embeddings.shape[1]}-d"
            )
        if self._blocks and self._blocks[-1][0].device != embeddings.device:  # e.g. restored on another device
            self._blocks = deque(
                (tuple(t.to(embeddings.device) for t in block) for block in self._blocks), maxlen=self.capacity + 1
            )
        self._blocks.append((embeddings.detach(), labels.detach(), fc.detach()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """All entries, oldest first: (M,D), (M,), (M,). Empty bank: shapes (0,0), (0,), (0,)."""
        if not self._blocks:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0)
        embeddings, labels, fc = zip(*self._blocks)
        return torch.cat(embeddings), torch.cat(labels), torch.cat(fc)

    def __len__(self) -> int:
        return sum(block[0].shape[0] for block in self._blocks)

    def state_dict(self) -> dict:
        """Plain tensors and lists (loadable with ``torch.load(weights_only=True)``), for exact resume."""
        return {
            "capacity": self.capacity,
            "embeddings": [block[0] for block in self._blocks],
            "labels": [block[1] for block in self._blocks],
            "fc": [block[2] for block in self._blocks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore saved entries; with a smaller capacity than saved, only the newest blocks are kept."""
        self._blocks.clear()
        for block in zip(state["embeddings"], state["labels"], state["fc"]):
            self.push(*block)


def sample_anchor_pixels(valid: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """Flat indices of up to ``num`` True entries of ``valid``, uniformly without replacement.

    ``num <= 0`` (exact mode) or fewer valid entries than ``num``: every valid index, in order. The one host
    synchronisation is ``nonzero`` (the count of valid entries decides the output size).
    """
    index = valid.reshape(-1).nonzero().squeeze(1)
    if num <= 0 or index.shape[0] <= num:
        return index
    device = generator.device if generator is not None else index.device
    order = torch.randperm(index.shape[0], generator=generator, device=device)[:num]
    return index[order.to(index.device)]


def _pixel_rows(maps: Tensor, index: Tensor) -> Tensor:
    """Rows (n,D) of a (B,D,h,w) map at flat pixel indices ``b*h*w + y*w + x``, without copying the whole map."""
    flat = maps.flatten(2)
    return flat[index // flat.shape[2], :, index % flat.shape[2]]


def cross_patch_contrastive(
    student_emb: Tensor,
    teacher_emb: Tensor,
    student_labels: Tensor,
    teacher_labels: Tensor,
    valid: Tensor | None,
    bank: MemoryBank | None,
    *,
    grid: int,
    bdp: float,
    fdp: float,
    temperature: float,
    num_anchors: int,
    num_bank_samples: int,
    anchor_source: str = "student",
    patch_filter: bool = True,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole cross-patch contrastive term of one iteration (PAPER.md, loss 5); updates ``bank``.

    ``student_emb`` / ``teacher_emb`` (B,D,h,w): L2-normalised embeddings of the strong / weak view;
    ``student_labels`` / ``teacher_labels`` (B,h,w): pseudo-labels (1 = foreground) at the same resolution;
    ``valid`` (B,h,w) bool or None: pixels whose pseudo-label is trusted (confidence filtering). Only valid
    pixels become anchors or bank entries.

    Anchors: student embeddings of valid pixels in anchor patches (FC <= bdp or FC >= fdp; every valid pixel when
    ``patch_filter`` is False), labels and FC from the student's (release) or teacher's prediction
    (``anchor_source``); ``num_anchors`` of them sampled (<= 0, or more than there are: all, exact mode).
    Positive: the teacher embedding at the same pixel (no gradient). Before the loss, the bank receives
    ``num_bank_samples`` (<= 0, or more than the valid pixels: all) detached student entries with student
    labels/FC and as many teacher entries with teacher labels/FC, so negatives come from other patches and images
    of this batch and from the ``bank.capacity`` earlier iterations (capacity 0 or no bank: this iteration's
    entries only). ``patch_filter`` False also drops the FC rule on negatives (plain dense pixel contrast, the
    ablation).

    Returns the mean over anchors (0, attached to the graph, when there is none) and tensor stats:
    ``n_anchors``, ``n_negatives`` (mean per anchor), ``bank_size``.
    """
    if anchor_source not in ANCHOR_SOURCES:
        raise ValueError(f"anchor_source must be {spoken(ANCHOR_SOURCES, quote=chr(39))}, got {anchor_source!r}")
    teacher_emb = teacher_emb.detach()
    student_fc = patch_foreground_ratio(student_labels, grid).reshape(-1)
    teacher_fc = patch_foreground_ratio(teacher_labels, grid).reshape(-1)
    student_labels, teacher_labels = student_labels.reshape(-1), teacher_labels.reshape(-1)
    valid = torch.ones_like(student_labels, dtype=torch.bool) if valid is None else valid.reshape(-1).bool()

    anchor_labels, anchor_fc = (
        (student_labels, student_fc) if anchor_source == "student" else (teacher_labels, teacher_fc)
    )
    if patch_filter:
        anchor_ok = valid & ((anchor_fc <= bdp + FC_TOLERANCE) | (anchor_fc >= fdp - FC_TOLERANCE))
    else:
        anchor_ok = valid
        bdp = fdp = math.inf  # every different-label entry is a negative
    anchors = sample_anchor_pixels(anchor_ok, num_anchors, generator)
    from_student = sample_anchor_pixels(valid, num_bank_samples, generator)
    from_teacher = sample_anchor_pixels(valid, num_bank_samples, generator)

    entries = (
        torch.cat([_pixel_rows(student_emb.detach(), from_student), _pixel_rows(teacher_emb, from_teacher)]),
        torch.cat([student_labels[from_student], teacher_labels[from_teacher]]),
        torch.cat([student_fc[from_student], teacher_fc[from_teacher]]),
    )
    if bank is not None:
        bank.push(*entries)
        entries = bank.tensors()
    bank_emb, bank_labels, bank_fc = entries

    device = student_emb.device
    stats = {
        "n_anchors": torch.full((), float(anchors.shape[0]), device=device),
        "bank_size": torch.full((), float(bank_emb.shape[0]), device=device),
    }
    if anchors.shape[0] == 0:
        stats["n_negatives"] = torch.zeros((), device=device)
        return student_emb.sum() * 0.0 + 0.0, stats  # 0 on the graph (+ 0.0: no "-0.0" in the logs)
    anchor_labels, anchor_fc = anchor_labels[anchors], anchor_fc[anchors]
    per_anchor = patch_contrastive_loss(
        _pixel_rows(student_emb, anchors),
        _pixel_rows(teacher_emb, anchors),
        bank_emb,
        anchor_labels,
        bank_labels,
        anchor_fc,
        bank_fc,
        temperature=temperature,
        bdp=bdp,
        fdp=fdp,
        chunk_size=chunk_size,
    )
    stats["n_negatives"] = (
        count_negatives(anchor_labels, bank_labels, anchor_fc, bank_fc, bdp=bdp, fdp=fdp, chunk_size=chunk_size)
        .float()
        .mean()
    )
    return per_anchor.mean(), stats
