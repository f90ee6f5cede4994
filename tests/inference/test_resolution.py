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
    check_request,
    estimate_scale,
    predict_at,
    rescale_image,
    resize_labels,
    scale_for,
)
from cdcl.instances.sizes import median_diameter, nucleus_diameters
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
    """Ideal predictions (the ground truth rescaled by ``factor``): each tile's estimated scale is 1/factor
    within 15%."""
    errors = []
    for tile in monuseg_tiles:
        side = round(TILE * factor)
        scale = estimate_scale(resize_labels(tile, (side, side)), median_diameter([tile]))
        errors.append(abs(1 / scale / factor - 1))
    assert max(errors) <= 0.15, sorted(errors)[-3:]
    assert np.median(errors) <= 0.03


def test_border_nuclei_are_left_out_unless_all_touch_it() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[disk((20, 20), 5)] = 1
    labels[:4, :4] = 2  # cut by the border
    assert nucleus_diameters(labels) == pytest.approx([2 * np.sqrt((labels == 1).sum() / np.pi)])
    assert len(nucleus_diameters(np.where(labels == 2, 2, 0))) == 1
    assert median_diameter([labels]) is None  # fewer than MIN_NUCLEI nuclei: no size


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
    labels = predict_at(predictor, image, 0.5)
    assert labels.shape == image.shape[:2]
    assert max(max(s) for s in recording.sides) == 128 and len(recording.sides) > 4  # ran on the 600 x 640 image
    plain = predict_instances(predictor, image)[1]
    assert labels.max() == plain.max() == len(centres)
    for c in centres:
        assert abs(int((labels == labels[c]).sum()) - int((plain == plain[c]).sum())) <= 0.1 * (plain == plain[c]).sum()


def test_mpp_auto_predicts_where_the_nuclei_have_the_training_size() -> None:
    image, centres = dark_discs(8)
    predictor = stand_in_predictor(mpp=0.25, window=128)
    predictor.nucleus_diameter = 32.0  # trained on nuclei twice as large: the image is enlarged 2x
    recording = Recording(predictor)
    labels = predict_at(predictor, image, "auto")
    assert labels.shape == image.shape[:2] and labels.max() == len(centres)
    first = len(recording.sides)
    assert first > 0
    predictor.nucleus_diameter = float(np.median(nucleus_diameters(labels)))  # already the training size: one pass
    recording.sides.clear()
    predict_at(predictor, image, "auto")
    assert len(recording.sides) < first / 2


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
