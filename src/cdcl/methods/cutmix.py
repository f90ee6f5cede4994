"""CutMix of unlabeled strong views (Yun et al. 2019, as UniMatch uses it): a box of the batch's previous image is
pasted into a view, and the pseudo-labels are mixed with the same box. Tensors only.

The views of one image share their geometry with its weak view, so the weak-view prediction of the pasted image,
mixed alike, is the pseudo-label of the mixed view pixel for pixel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AREA = (0.02, 0.4)  # box area as a fraction of the view (UniMatch's range)
ASPECT = (0.3, 1 / 0.3)  # box height / width


def cutmix_boxes(batch: int, size: tuple[int, int], prob: float, generator: torch.Generator) -> Tensor:
    """(B,H,W) bool on the CPU: for each image, with probability ``prob``, one box of random area and aspect
    placed uniformly where it fits; all False otherwise. Every draw comes from ``generator``."""
    h, w = size
    boxes = torch.zeros(batch, h, w, dtype=torch.bool)
    for i, (use, area, aspect, y, x) in enumerate(torch.rand(batch, 5, generator=generator).tolist()):
        if use >= prob:
            continue
        area = (AREA[0] + (AREA[1] - AREA[0]) * area) * h * w
        aspect = ASPECT[0] + (ASPECT[1] - ASPECT[0]) * aspect
        bh, bw = min(h, max(1, round(math.sqrt(area * aspect)))), min(w, max(1, round(math.sqrt(area / aspect))))
        top, left = int(y * (h - bh + 1)), int(x * (w - bw + 1))
        boxes[i, top : top + bh, left : left + bw] = True
    return boxes


def cutmix(x: Tensor, boxes: Tensor) -> Tensor:
    """``x`` (B,C,H,W) with each image's box (``boxes`` (B,H,W) bool) taken from the previous image of the batch
    (the first's from the last); a batch of one is left as it is."""
    return torch.where(boxes.to(x.device)[:, None], x.roll(1, dims=0), x)
