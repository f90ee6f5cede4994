"""Test-time augmentation: models symmetric by construction predict the same with and without it, the transforms
are undone exactly, and switching it off leaves the plain prediction untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcl.inference.tta import TRANSFORMS, augmented_maps, forward, inverse
from cdcl.inference.window import sliding_window_probability
from cdcl.instances.representations import prediction_maps
from cdcl.testing.slides import DarkStandIn
from cdcl.vocab import TTA_MODES


class SymmetricConv(torch.nn.Module):
    """Two 3x3 convolutions whose kernels are invariant under every flip and 90-degree rotation (zero padding,
    itself symmetric): the model commutes with the 8 symmetries of the square, yet sees context."""

    def __init__(self, classes: int = 2, representation: str = "binary") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.representation = representation
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, classes, 3, padding=1)
        )
        with torch.no_grad():
            for conv in (self.body[0], self.body[2]):
                w = conv.weight
                w.copy_(sum(forward(w, t) for t in TRANSFORMS["dihedral"]) / 8)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


class PointwiseInstances(DarkStandIn):
    """The stand-in with a third (marker) channel: a learned-representation model that is pointwise."""

    representation = "three_class"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.conv(x)
        return {"logits": torch.cat([logits, 0.5 * logits[:, 1:] - x[:, :1]], dim=1)}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """An asymmetric 70 x 200 image: shorter than the window on one side, so windows are 96 x 128."""
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (70, 200, 3), dtype=np.uint8)


def test_every_transform_is_undone_exactly_and_the_eight_differ() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    seen = set()
    for transform in TRANSFORMS["dihedral"]:
        assert torch.equal(inverse(forward(x, transform), transform), x)
        seen.add(forward(x[0, 0, :4, :4], transform).numpy().tobytes())
    assert len(seen) == 8
    assert set(TRANSFORMS) == set(TTA_MODES) and set(TRANSFORMS["flips"]) < set(TRANSFORMS["dihedral"])


@pytest.mark.parametrize("mode", TTA_MODES)
@pytest.mark.parametrize(
    "model", [DarkStandIn(), SymmetricConv(), PointwiseInstances()], ids=lambda m: type(m).__name__
)
def test_a_symmetric_model_predicts_the_same_with_tta(image, model, mode) -> None:
    plain = sliding_window_probability(model, image, window=128, overlap=0.25)
    augmented = sliding_window_probability(model, image, window=128, overlap=0.25, tta=mode)
    assert augmented.shape == plain.shape
    np.testing.assert_allclose(augmented, plain, atol=2e-6)


def test_tta_averages_the_maps_turned_back() -> None:
    """A model that is not symmetric: the result is the mean of its maps on each transformed batch, turned back."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1))
    wrapped = lambda x: {"logits": model(x)}  # noqa: E731
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        expected = sum(
            inverse(prediction_maps(wrapped(forward(x, t))["logits"], "distance"), t) for t in TRANSFORMS["dihedral"]
        )
        got = augmented_maps(wrapped, x, "distance", "dihedral")
    assert got.shape == (2, 2, 32, 64)
    torch.testing.assert_close(got, expected / 8)
    assert not torch.allclose(got, augmented_maps(wrapped, x, "distance", "none"))


def test_tta_off_is_the_plain_prediction_bit_for_bit() -> None:
    model = SymmetricConv(classes=3, representation="distance")
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(augmented_maps(model, x, "distance"), prediction_maps(model(x)["logits"], "distance"))
