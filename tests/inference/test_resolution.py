"""Predicting at the model's resolution: the nucleus-size statistic recovers known rescale factors on MoNuSeg,
``--mpp`` rescales the image for the model and the instances back, ``--mpp auto`` finds the scale itself."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from cdcl.data import load_dataset
from cdcl.errors import CdclError
from cdcl.inference.predictor import predict_instances
from cdcl.inference.resolution import (
    auto_instances,
    check_request,
    next_log_scale,
    predict_at,
    rescale_image,
    resize_labels,
    scale_for,
)
from cdcl.instances.sizes import nucleus_diameter
from cdcl.testing.slides import stand_in_predictor

FACTORS = (0.5, 0.67, 1.0, 1.5, 2.0)  # the rescale factors of the issue (benchmarks/resolution.py)
TILE = 250  # the MoNuSeg tiles of the semi-supervised protocol


@pytest.fixture(scope="module")
def monuseg_tiles(shared_data) -> list[np.ndarray]:
    """Ground-truth instance maps of 250 px tiles of two MoNuSeg test images (32 tiles)."""
    dataset = load_dataset(shared_data / "monuseg" / "test", "monuseg")
    maps = [item.instances for item in list(dataset)[:2]]
    return [m[y : y + TILE, x : x + TILE] for m in maps for y in range(0, 1000, TILE) for x in range(0, 1000, TILE)]


@pytest.mark.parametrize("factor", FACTORS)
def test_the_size_statistic_recovers_known_rescale_factors_on_monuseg_tiles(monuseg_tiles, factor) -> None:
    """Ideal predictions (the ground truth rescaled by ``factor``): each tile's size over its size at 1x is the
    factor within 15%."""
    errors = []
    for tile in monuseg_tiles:
        side = round(TILE * factor)
        errors.append(
            abs(nucleus_diameter([resize_labels(tile, (side, side))]) / nucleus_diameter([tile]) / factor - 1)
        )
    assert max(errors) <= 0.15, sorted(errors)[-3:]
    assert np.median(errors) <= 0.05


def test_the_size_of_discs_is_their_diameter_and_needs_a_few_nuclei() -> None:
    labels = np.zeros((200, 200), np.int32)
    for i, centre in enumerate([(40, 40), (40, 140), (100, 90), (160, 40), (160, 150)]):
        labels[disk(centre, 15)] = i + 1
    assert nucleus_diameter([labels]) == pytest.approx(30, rel=0.05)
    assert nucleus_diameter([labels[:100]]) is None  # 2-3 nuclei: no size
    assert nucleus_diameter([np.ones((10, 10), np.int32)] * 9) is None  # no background to measure from


def test_labels_scale_back_to_the_image_size_with_sequential_ids() -> None:
    labels = np.zeros((30, 40), np.int32)
    labels[5:15, 5:15], labels[20:24, 30:34] = 7, 3
    big = resize_labels(labels, (60, 80))
    assert big.shape == (60, 80) and set(np.unique(big)) == {0, 1, 2}
    np.testing.assert_array_equal(resize_labels(big, (30, 40)) > 0, labels > 0)
    assert rescale_image(np.zeros((30, 40, 3), np.uint8), 0.5).shape == (15, 20, 3)


def dark_discs(radius: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A pale 300 x 320 image with 8 dark discs of ``radius`` px."""
    image = np.full((300, 320, 3), 235, np.uint8)
    centres = [(60 + 90 * i, 50 + 75 * j) for i in range(2) for j in range(4)]
    for c in centres:
        image[disk(c, radius)] = (80, 40, 120)
    return image, centres


class Recording:
    """Wraps a model to record the input sizes it is run on."""

    def __init__(self, predictor) -> None:
        self.sides: list[tuple[int, int]] = []
        model = predictor.model
        original = model.forward

        def forward(x):
            self.sides.append(tuple(x.shape[-2:]))
            return original(x)

        model.forward = forward


def test_mpp_rescales_for_the_model_and_back() -> None:
    """A 0.5 um/px image for a 0.25 um/px model: predicted at twice the size, nuclei returned at the image's."""
    image, centres = dark_discs(10)
    predictor = stand_in_predictor(mpp=0.25, window=128)
    recording = Recording(predictor)
    labels, scale = predict_at(predictor, image, 0.5)
    assert scale == 2.0
    assert labels.shape == image.shape[:2]
    assert max(max(s) for s in recording.sides) == 128 and len(recording.sides) > 4  # ran on the 600 x 640 image
    plain = predict_instances(predictor, image)[1]
    assert labels.max() == plain.max() == len(centres)
    for c in centres:
        assert abs(int((labels == labels[c]).sum()) - int((plain == plain[c]).sum())) <= 0.1 * (plain == plain[c]).sum()


def test_mpp_auto_predicts_where_the_nuclei_have_the_training_size() -> None:
    image, centres = dark_discs(8)
    predictor = stand_in_predictor(mpp=0.25, window=128)
    predictor.nucleus_diameter = 2 * nucleus_diameter([predict_instances(predictor, image)[1]])
    recording = Recording(predictor)
    labels, scale = auto_instances(predictor, image)
    assert scale == pytest.approx(2, rel=0.1)  # trained on nuclei twice as large: the image is enlarged 2x
    assert labels.shape == image.shape[:2] and labels.max() == len(centres)
    np.testing.assert_array_equal(labels, predict_at(predictor, image, "auto")[0])
    passes = len(recording.sides)
    predictor.nucleus_diameter /= 2  # already the training size: one pass, at the image's pixels
    recording.sides.clear()
    assert auto_instances(predictor, image)[1] == 1.0 and len(recording.sides) < passes / 4


def test_the_secant_step_follows_the_measured_response() -> None:
    assert next_log_scale([(0.0, 0.4)]) == pytest.approx(-0.4)  # one pass: undo the measured ratio
    # the size followed only half the rescale: aim twice as far
    assert next_log_scale([(0.0, 0.4), (-0.4, 0.2)]) == pytest.approx(-0.8)
    assert next_log_scale([(0.0, 0.4), (-0.4, 0.39)]) == pytest.approx(-0.4 - 0.39 / 0.5)  # slope kept >= 0.5


def test_requests_the_checkpoint_cannot_serve_are_refused() -> None:
    predictor = stand_in_predictor(mpp=None)
    check_request(predictor, None)
    with pytest.raises(CdclError, match="training resolution"):
        check_request(predictor, 0.5)
    with pytest.raises(CdclError, match="nucleus size"):
        check_request(predictor, "auto")
    with pytest.raises(CdclError, match="more than 4x coarser"):
        scale_for(2.0, 0.25)
    assert scale_for(0.26, 0.25) == 1.0 and scale_for(0.5, 0.25) == 2.0
