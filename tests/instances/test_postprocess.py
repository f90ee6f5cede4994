"""Probability map -> instances: separation of touching nuclei, cleaning, settings, and tuning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from cdcl.instances.postprocess import (
    PostprocessParams,
    _finish,
    _remove_small,
    distance_to_background,
    fill_holes_of,
    instances_from_probability,
    tune_params,
)
from cdcl.metrics import aji


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def soft(mask: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(mask.astype(float), 1.0)


def best_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    ids = np.unique(labels[mask & (labels > 0)])
    return max(((labels == i) & mask).sum() / ((labels == i) | mask).sum() for i in ids) if len(ids) else 0.0


def test_touching_discs_become_two_instances():
    a, b = disc((40, 60), (20, 20), 10), disc((40, 60), (20, 37), 10)  # overlapping by a 20-pixel lens
    labels = instances_from_probability(soft(a | b))
    assert labels.dtype == np.int32 and labels.shape == (40, 60)
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert best_iou(labels, a & ~b) > 0.85 and best_iou(labels, b & ~a) > 0.85
    assert labels[20, 20] != labels[20, 37]


def test_separate_nuclei_get_sequential_ids():
    masks = [disc((50, 50), c, 5) for c in ((10, 10), (10, 40), (40, 25))]
    labels = instances_from_probability(soft(np.any(masks, axis=0)))
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    assert all(best_iou(labels, m) > 0.8 for m in masks)


def test_small_specks_removed():
    prob = soft(disc((30, 30), (15, 15), 6))
    prob[2:4, 2:4] = 0.9  # a 4-pixel speck
    assert instances_from_probability(prob)[2:4, 2:4].max() == 0  # min_size 10
    kept = instances_from_probability(prob, PostprocessParams(min_size=0))
    assert kept[2:4, 2:4].min() > 0 and kept.max() == 2


def test_holes_filled():
    ring = disc((30, 30), (15, 15), 9) & ~disc((30, 30), (15, 15), 3)
    prob = ring * 0.9
    filled = instances_from_probability(prob)
    assert filled[15, 15] == filled[15, 6] == 1 and filled.max() == 1
    open_ring = instances_from_probability(prob, PostprocessParams(fill_holes=False, min_distance=10))
    assert open_ring[15, 15] == 0 and open_ring[15, 6] > 0


def test_threshold_is_strict():
    prob = np.zeros((20, 20))
    prob[5:15, 5:15] = 0.5
    assert instances_from_probability(prob).max() == 0  # 0.5 is not > 0.5
    assert instances_from_probability(prob, PostprocessParams(threshold=0.49)).max() == 1


def test_empty_probability_gives_zeros():
    labels = instances_from_probability(np.zeros((32, 48), dtype=np.float32))
    assert labels.dtype == np.int32 and labels.shape == (32, 48) and not labels.any()


def test_real_nuclei_shapes_separated(shared_data):
    """Blurred real MoNuSeg nuclei with faint seams between touching ones: watershed beats connected components."""
    gt = np.array(Image.open(shared_data / "monuseg" / "train" / "masks" / "TCGA-HE-7130-01Z-00-DX1.png"))
    gt = gt[:256, :256].astype(np.int64)
    # Seam: a pixel whose 3x3 neighbourhood holds two nucleus ids and no background.
    low, high = ndi.grey_erosion(gt, size=3), ndi.grey_dilation(gt, size=3)
    prob = ndi.gaussian_filter(((gt > 0) & ~((low > 0) & (low != high))).astype(float), 1.0)
    labels = instances_from_probability(prob)
    components = ndi.label(prob > 0.5)[0]
    assert aji(gt, labels)["aji"] > 0.8
    assert aji(gt, labels)["aji"] > aji(gt, components)["aji"] + 0.1


def synthetic_case(seed: int, true_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Discs of radius 7 whose probability crosses ``true_threshold`` exactly on the disc edge."""
    rng = np.random.default_rng(seed)
    centres = [(r, c) for r in range(12, 120, 24) for c in range(12, 120, 24)]
    gt = np.zeros((128, 128), dtype=np.int32)
    dist = np.full(gt.shape, np.inf)
    yy, xx = np.mgrid[:128, :128]
    for i, (r, c) in enumerate(centres, start=1):
        r, c = r + rng.integers(-2, 3), c + rng.integers(-2, 3)
        d = np.hypot(yy - r, xx - c)
        gt[(d <= 7) & (gt == 0)] = i
        dist = np.minimum(dist, d)
    logit = np.log(true_threshold / (1 - true_threshold))
    prob = 1 / (1 + np.exp((dist - 7 - 2 * logit) / 2))  # prob(7) = true_threshold
    return prob, gt


def test_tune_params_recovers_the_true_threshold():
    cases = [synthetic_case(seed, 0.7) for seed in range(2)]
    params, score = tune_params([p for p, _ in cases], [g for _, g in cases], {"threshold": [0.3, 0.5, 0.7, 0.9]})
    assert params.threshold == 0.7
    assert score > 0.95
    assert score == pytest.approx(np.mean([aji(g, instances_from_probability(p, params))["aji"] for p, g in cases]))


def test_params_round_trip_and_validation():
    params = PostprocessParams(threshold=0.4, min_distance=5, min_size=0, fill_holes=False)
    assert PostprocessParams.from_dict(params.to_dict()) == params
    assert params.to_dict() == {"threshold": 0.4, "min_distance": 5, "min_size": 0, "fill_holes": False}
    from_numpy = PostprocessParams(np.float32(0.5), np.int64(3), np.int32(10), np.bool_(True)).to_dict()
    assert from_numpy == PostprocessParams().to_dict()
    assert [type(v) for v in from_numpy.values()] == [float, int, int, bool]
    with pytest.raises(ValueError, match="unknown post-processing setting.*sigma"):
        PostprocessParams.from_dict({"threshold": 0.5, "sigma": 2})
    for bad in ({"threshold": 1.0}, {"threshold": "0.5"}, {"min_distance": 0}, {"min_size": 2.5}, {"fill_holes": 1}):
        with pytest.raises(ValueError):
            PostprocessParams(**bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D float"):
        instances_from_probability(np.zeros((4, 4), dtype=np.uint8))
    prob = np.zeros((8, 8))
    with pytest.raises(ValueError, match="unknown post-processing setting"):
        tune_params([prob], [np.zeros((8, 8), int)], {"thresh": [0.5]})
    with pytest.raises(ValueError, match="as many"):
        tune_params([prob], [])
    with pytest.raises(ValueError, match="differ in shape"):
        tune_params([prob], [np.zeros((8, 9), int)])
    with pytest.raises(ValueError):
        tune_params([prob], [np.zeros((8, 8), int)], {"min_distance": [0]})


def test_fill_holes_equals_scipy_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = rng.random((rng.integers(1, 40), rng.integers(1, 40))) > rng.uniform(0.2, 0.8)
        assert np.array_equal(fill_holes_of(mask), ndi.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes_of(ring)[4, 4] and fill_holes_of(ring).sum() == 25


def test_distance_to_background_equals_scipy_bit_for_bit():
    rng = np.random.default_rng(0)
    masks = [rng.random((rng.integers(1, 60), rng.integers(1, 60))) > rng.uniform(0.05, 0.95) for _ in range(300)]
    masks += [
        np.ones((7, 9), bool),
        np.zeros((7, 9), bool),
        np.eye(12, dtype=bool)[:, ::-1],
        ndi.binary_dilation(np.eye(40, dtype=bool), iterations=6),
    ]
    for mask in masks:
        expected = ndi.distance_transform_edt(mask)
        got = distance_to_background(mask)
        assert got.dtype == np.float64 and np.array_equal(got, expected), mask.shape
    assert distance_to_background(np.pad(np.ones((5, 5), bool), 1))[3, 3] == 3.0


def test_finish_equals_remove_small_then_relabel_sequential():
    rng = np.random.default_rng(1)
    for min_size in (0, 1, 4, 12):
        labels = rng.choice([0, 3, 7, 8, 20, 41], p=[0.5, 0.2, 0.01, 0.15, 0.1, 0.04], size=(30, 30))
        expected = relabel_sequential(_remove_small(labels, min_size))[0]
        got = _finish(labels, min_size)
        assert got.dtype == np.int32 and np.array_equal(got, expected), min_size
        assert np.array_equal(np.unique(got)[1:], np.arange(1, got.max() + 1))
