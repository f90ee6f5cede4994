"""Test-time augmentation: the prediction maps of a batch of windows averaged over flips and 90-degree rotations.

Each transform is applied to the windows, the model predicts, and its maps are turned back before they are
averaged, so every map is averaged in the input's orientation. Averaging happens on the maps post-processing reads
(foreground probability, marker strength), never on logits: both maps are scalar per pixel (no direction, unlike
a gradient map), so turning them back is all a transform needs. The sliding window (``cdcl.inference.window``)
calls this for every batch, so tiles, folders, evaluation and slides all get the same augmentation.

Modes (:data:`cdcl.vocab.TTA_MODES`): ``none`` (one pass, the plain prediction bit for bit), ``flips`` (identity,
horizontal and vertical flip, 180-degree rotation: 4 passes, the window keeps its shape) and ``dihedral`` (those
and their transposes: all 8 symmetries of the square, 8 passes). A rotation by 90 degrees turns an ``h x w``
window into ``w x h``; both sides stay multiples of 32, which the fully convolutional models accept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdcl.instances.representations import prediction_maps

Transform = tuple[int, bool]  # (quarter turns counter-clockwise, horizontal flip first)

TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),  # identity, h-flip, v-flip, 180 degrees
    "dihedral": tuple((turns, flip) for flip in (False, True) for turns in range(4)),
}
"""The transforms of each mode: keys are :data:`cdcl.vocab.TTA_MODES`."""


def forward(x: Tensor, transform: Transform) -> Tensor:
    """``x`` (..., H, W) flipped left-right (when asked), then turned ``turns`` quarter turns."""
    turns, flip = transform
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, turns, dims=(-2, -1)) if turns else x


def inverse(x: Tensor, transform: Transform) -> Tensor:
    """Undo :func:`forward`: turn back, then flip back."""
    turns, flip = transform
    if turns:
        x = torch.rot90(x, -turns, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def augmented_maps(model: torch.nn.Module, pixels: Tensor, representation: str, mode: str = "none") -> Tensor:
    """Prediction maps of a (B, 3, H, W) batch in [0, 1] (``prediction_maps``'s shapes), averaged over the
    transforms of ``mode``. ``none`` runs the model once on ``pixels`` as they are."""
    transforms = TRANSFORMS[mode]
    if len(transforms) == 1:
        return prediction_maps(model(pixels)["logits"].float(), representation)
    total = None
    for transform in transforms:
        maps = prediction_maps(model(forward(pixels, transform))["logits"].float(), representation)
        maps = inverse(maps, transform)
        total = maps if total is None else total + maps
    return total / len(transforms)
