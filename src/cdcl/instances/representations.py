"""How nuclei are encoded as network outputs, and how those outputs become the maps post-processing reads.

Three instance representations, one vocabulary (:data:`REPRESENTATIONS`):

- ``binary``: two classes (background, nucleus); the paper's model. Instances come from a distance-transform
  watershed of the foreground alone (``cdcl.instances.postprocess.instances_from_probability``).
- ``three_class``: background, nucleus interior, nucleus boundary (the inner ring of each instance, touching
  borders included). Interiors are the markers, grown over the foreground.
- ``distance``: two classes plus one channel regressing each nucleus's distance to its own boundary, divided by
  its largest value (1 at the centre, small at the rim, 0 on background). Markers are its high plateaus.

The two learned representations decode to the same two maps (foreground probability, marker strength), so one
marker-controlled watershed (``cdcl.instances.postprocess.instances_from_markers``) serves both. The binary model
keeps its single foreground map, so its predictions stay bit-for-bit those of the earlier releases.
"""

from __future__ import annotations

from typing import Literal, get_args

import edt
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import Tensor

Representation = Literal["binary", "three_class", "distance"]
REPRESENTATIONS: tuple[str, ...] = get_args(Representation)
OUTPUT_CHANNELS = {"binary": 2, "three_class": 3, "distance": 3}
MAP_CHANNELS = {"binary": 1, "three_class": 2, "distance": 2}  # prediction maps post-processing reads
OutputStride = Literal[1, 2, 4]  # where the classifier works (model.output_stride): 4 is the paper's model
OUTPUT_STRIDES: tuple[int, ...] = get_args(OutputStride)
BOUNDARY_WIDTH = 2  # pixels of each instance's inner ring labelled boundary (three_class)


def representation_of(model: torch.nn.Module) -> str:
    """The instance representation a model predicts; a model without one (a stand-in) is binary."""
    return getattr(model, "representation", "binary")


def check_representation(name: str) -> str:
    if name not in REPRESENTATIONS:
        raise ValueError(f"unknown instance representation '{name}' (valid: {', '.join(REPRESENTATIONS)})")
    return name


# ---- targets (numpy, per training view) --------------------------------------------------------------------
def boundary_ring(instances: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """Pixels of an instance at most ``width`` px from a pixel of another label (background or another
    nucleus); the image border is not a boundary (a nucleus cut by a crop keeps its interior there)."""
    inside = edt.edt(np.ascontiguousarray(instances, dtype=np.uint32), black_border=False, parallel=1)
    return (instances > 0) & (inside <= width)


def normalised_distance(instances: np.ndarray) -> np.ndarray:
    """Per nucleus: Euclidean distance to its boundary divided by its largest value, float32 in [0, 1]."""
    labels = np.ascontiguousarray(instances, dtype=np.uint32)
    inside = edt.edt(labels, black_border=False, parallel=1).astype(np.float32)
    if not labels.any():
        return inside
    unbounded = ~np.isfinite(inside)  # a nucleus filling the whole view has no boundary in it: edt answers inf
    inside[unbounded] = 0
    peak = ndi.maximum(inside, labels, index=np.arange(labels.max() + 1)).astype(np.float32)
    peak[0] = 1.0
    distance = inside / np.maximum(peak[labels], np.float32(1e-6))
    distance[unbounded] = 1.0
    return distance


def make_targets(instances: np.ndarray, representation: str) -> dict[str, np.ndarray]:
    """Training targets of one (augmented) instance map: ``target`` int64 classes, and ``distance`` float32 for
    the distance representation. Computed per view: ~1 ms for a 256 px crop, so nothing is cached."""
    foreground = instances > 0
    if representation == "three_class":
        classes = foreground.astype(np.int64)
        classes[boundary_ring(instances)] = 2
        return {"target": classes}
    targets = {"target": foreground.astype(np.int64)}
    if representation == "distance":
        targets["distance"] = normalised_distance(instances)
    return targets


# ---- network outputs (torch) ------------------------------------------------------------------------------
def class_logits(logits: Tensor, representation: str) -> Tensor:
    """The classification channels (all but the distance channel)."""
    return logits[:, :2] if representation == "distance" else logits


def foreground_logits(classes: Tensor) -> Tensor:
    """Two-class (background, nucleus) logits from 2 or 3 class logits: nucleus = interior or boundary, so its
    logit is their log-sum-exp (softmax of the result is exactly (p_bg, p_int + p_bnd))."""
    if classes.shape[1] == 2:
        return classes
    return torch.stack([classes[:, 0], torch.logsumexp(classes[:, 1:], dim=1)], dim=1)


def distance_prediction(logits: Tensor) -> Tensor:
    """(B, H, W) predicted normalised distance in [0, 1]."""
    return torch.sigmoid(logits[:, 2].float())


def prediction_maps(logits: Tensor, representation: str) -> Tensor:
    """What post-processing reads: (B, H, W) foreground probability for ``binary``; (B, 2, H, W) foreground
    probability and marker strength (interior probability, or predicted distance) otherwise."""
    logits = logits.float()
    if representation == "binary":
        return torch.softmax(logits, dim=1)[:, 1]
    probs = torch.softmax(class_logits(logits, representation), dim=1)
    if representation == "three_class":
        return torch.stack([1.0 - probs[:, 0], probs[:, 1]], dim=1)
    return torch.stack([probs[:, 1], distance_prediction(logits)], dim=1)


def supervised_loss(
    logits: Tensor, batch: dict[str, Tensor], representation: str, w_distance: float = 1.0, boundary_weight: float = 3.0
) -> Tensor:
    """Cross-entropy on the classes (the thin boundary class weighted by ``boundary_weight``), plus (distance) the
    squared error of the distance map over every pixel."""
    logits = logits.float()
    weight = None
    if representation == "three_class" and boundary_weight != 1.0:
        weight = torch.tensor([1.0, 1.0, boundary_weight], device=logits.device)
    loss = F.cross_entropy(class_logits(logits, representation), batch["target"], weight=weight)
    if representation == "distance" and w_distance > 0:
        loss = loss + w_distance * F.mse_loss(distance_prediction(logits), batch["distance"].float())
    return loss


def distance_consistency(student_logits: Tensor, teacher_logits: Tensor, confident: Tensor | None) -> Tensor:
    """Squared error between student and teacher distance maps on ``confident`` pixels (all when None); 0 with
    the graph intact when no pixel is confident."""
    error = (distance_prediction(student_logits) - distance_prediction(teacher_logits).detach()) ** 2
    if confident is None:
        return error.mean()
    mask = confident.to(error.dtype)
    return (error * mask).sum() / mask.sum().clamp_min(1.0)
