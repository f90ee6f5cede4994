"""Sliding-window inference: tiled equals whole, borders, odd sizes, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk

from cdcl.inference.predictor import predict_instances
from cdcl.inference.window import gaussian_weight, sliding_window_probability, windows_per_batch
from cdcl.testing.slides import DarkStandIn, stand_in_predictor
from cdcl.windows import window_starts


def expected_probability(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The model applied to the whole image at once (valid for pointwise models at any size)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return torch.softmax(model(x)["logits"], dim=1)[0, 1].numpy()


class ShapeRecorder(DarkStandIn):
    """Records every input shape (the network must only ever see multiples of 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


class Context3x3(torch.nn.Module):
    """A fully convolutional model with a 5x5 receptive field (two 3x3 convolutions, zero padding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


@pytest.fixture(scope="module")
def tissue(shared_data) -> np.ndarray:
    """A real H&E crop (MoNuSeg) with an odd size."""
    path = sorted((shared_data / "monuseg" / "train" / "images").glob("*.tif"))[0]
    return np.asarray(Image.open(path).convert("RGB"))[:300, :270].copy()


def test_gaussian_weight_peaks_in_the_centre_and_stays_positive() -> None:
    w = gaussian_weight(65)
    assert w.shape == (65, 65) and w.dtype == np.float32
    assert w[32, 32] == pytest.approx(1.0)
    assert 1e-7 < w.min() < 1e-6  # corners: about exp(-8) per axis, positive in float32
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert np.all(np.diff(w[32, :33]) > 0)  # rises towards the centre
    assert gaussian_weight((32, 64)).shape == (32, 64)


def test_window_starts_cover_the_length_and_end_flush() -> None:
    assert window_starts(256, 256, 0.25) == [0]
    assert window_starts(300, 128, 0.25) == [0, 96, 172]
    assert window_starts(320, 128, 0.5) == [0, 64, 128, 192]


def test_windows_per_batch_asked_for_else_configured_and_at_least_16_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert [windows_per_batch(None, n, cpu) for n in (1, 4, 32)] == [1, 4, 32]
    assert [windows_per_batch(None, n, cuda) for n in (1, 4, 32)] == [16, 16, 32]
    assert windows_per_batch(2, 4, cuda) == windows_per_batch(2, 4, cpu) == 2


@pytest.mark.parametrize("window,overlap,batch_size", [(128, 0.25, 1), (128, 0.5, 3), (64, 0.25, 16), (256, 0.0, 4)])
def test_tiled_equals_whole_for_a_pointwise_model(tissue, window, overlap, batch_size) -> None:
    model = DarkStandIn()
    prob = sliding_window_probability(model, tissue, window=window, overlap=overlap, batch_size=batch_size)
    assert prob.shape == tissue.shape[:2] and prob.dtype == np.float32
    np.testing.assert_allclose(prob, expected_probability(model, tissue), atol=1e-5)
    assert 0.01 < (prob > 0.5).mean() < 0.6  # the stand-in finds dark nuclei, not everything or nothing


def test_tiled_equals_one_window_where_the_image_fits(tissue) -> None:
    """With context, tiles differ from one whole-image window only near window borders; Gaussian blending
    keeps those pixels' weight small, so the interior agrees exactly and the rest closely."""
    model = Context3x3()
    image = tissue[:256, :256]
    whole = sliding_window_probability(model, image, window=256)
    np.testing.assert_allclose(whole, expected_probability(model, image), atol=1e-5)
    tiled = sliding_window_probability(model, image, window=128, overlap=0.5, batch_size=2)
    np.testing.assert_allclose(tiled, whole, atol=5e-3)
    # where every covering window sees the full receptive field, blending four windows is exact
    np.testing.assert_allclose(tiled[92:100, 92:100], whole[92:100, 92:100], atol=1e-5)
    assert np.abs(tiled - whole).max() > 1e-5  # the model does depend on context


def test_images_smaller_than_the_window_and_odd_sizes(tissue) -> None:
    model = ShapeRecorder()
    for h, w in [(40, 70), (1, 1), (33, 200), (300, 270)]:
        image = tissue[:h, :w]
        prob = sliding_window_probability(model, image, window=128, batch_size=3)
        assert prob.shape == (h, w)
        np.testing.assert_allclose(prob, expected_probability(DarkStandIn(), image), atol=1e-5)
    assert all(s[2] % 32 == 0 and s[3] % 32 == 0 and s[2] <= 128 and s[3] <= 128 for s in model.shapes)
    assert max(s[0] for s in model.shapes) == 3  # batches never exceed batch_size
    assert (1, 3, 32, 32) in model.shapes  # a 1x1 image is reflect-padded to one 32x32 window


def test_amp_is_ignored_on_cpu_and_bad_arguments_fail(tissue) -> None:
    model = DarkStandIn()
    a = sliding_window_probability(model, tissue, window=128, amp=True, device="cpu")
    np.testing.assert_array_equal(a, sliding_window_probability(model, tissue, window=128))
    with pytest.raises(ValueError, match="multiple of 32"):
        sliding_window_probability(model, tissue, window=100)
    with pytest.raises(ValueError, match="uint8"):
        sliding_window_probability(model, tissue.astype(np.float32), window=128)


def test_predict_instances_finds_each_dark_disc() -> None:
    image = np.full((200, 230, 3), 240, np.uint8)
    centres = [(40, 50), (120, 60), (100, 170), (170, 190)]
    for c in centres:
        image[disk(c, 12)] = (90, 40, 120)
    prob, labels = predict_instances(stand_in_predictor(window=128), image)
    assert prob.shape == labels.shape == (200, 230)
    assert len(np.unique(labels[labels > 0])) == len(centres)
    for c in centres:
        assert labels[c] > 0
        assert (labels == labels[c]).sum() == pytest.approx(len(disk(c, 12)[0]), abs=2)
