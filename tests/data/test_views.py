"""Training views: exact pixel correspondence of weak/strong pairs, label alignment, padding, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cdcl.data.show import COLUMNS, views_grid
from cdcl.data.views import AugmentConfig, eval_view, labeled_view, paired_views, sample_geometry

NO_PHOTOMETRY = dict(brightness=0, contrast=0, saturation=0, hue=0, blur_prob=0, noise_std=0, grey_prob=0, hed_sigma=0)
NUCLEUS = np.array([90, 30, 150], np.uint8)


def coordinate_image(h: int, w: int) -> np.ndarray:
    """Red = row, green = column, blue = a constant: each pixel names its own source position."""
    rows, cols = np.mgrid[:h, :w]
    return np.stack([rows, cols, np.full((h, w), 77)], axis=-1).astype(np.uint8)


def source_coords(view: np.ndarray) -> np.ndarray:
    """3xSxS view of a coordinate image -> SxSx2 integer (row, column) of the source pixel."""
    return np.round(view[:2] * 255).astype(int).transpose(1, 2, 0)


def rigid_orientation(coords: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """The source step taken by one step down and one step right, asserting it is the same everywhere."""
    down = np.unique((coords[1:] - coords[:-1]).reshape(-1, 2), axis=0)
    right = np.unique((coords[:, 1:] - coords[:, :-1]).reshape(-1, 2), axis=0)
    assert len(down) == 1 and len(right) == 1, "the view is not one rigid copy of the source"
    d, r = tuple(down[0]), tuple(right[0])
    assert sorted(map(abs, d + r)) == [0, 0, 1, 1] and d != r and d != tuple(-v for v in r)
    return d, r


def blob_image(rng: np.random.Generator, h: int = 200, w: int = 180) -> tuple[np.ndarray, np.ndarray]:
    """Pink background with purple square 'nuclei' (some touching the image edge) and their instance map."""
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (230, 170, 210)
    instances = np.zeros((h, w), np.int32)
    for k in range(1, 26):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        if k <= 4:  # against each edge
            y, x = [(0, x), (h - 8, x), (y, 0), (y, w - 8)][k - 1]
        instances[y : y + 8, x : x + 8] = k
    image[instances > 0] = NUCLEUS
    return image, instances


def test_weak_equals_strong_without_photometry_and_is_a_rigid_crop() -> None:
    image = coordinate_image(240, 250)
    cfg = AugmentConfig(crop_size=128, **NO_PHOTOMETRY)
    orientations = set()
    for seed in range(40):
        weak, strong = paired_views(image, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(weak, strong)
        coords = source_coords(weak)
        orientations.add(rigid_orientation(coords))
        assert coords.min() >= 0 and coords[..., 0].max() < 240 and coords[..., 1].max() < 250
    assert len(orientations) == 8  # all flips and quarter turns occur


@pytest.mark.parametrize("scale", [None, (0.8, 1.25)])
def test_weak_view_is_the_geometry_drawn_first_from_the_same_seed(scale: tuple[float, float] | None) -> None:
    """Geometry is drawn before any photometric draw, so one seed fixes the source pixel of every view pixel."""
    image = coordinate_image(240, 250)
    coords = np.stack(np.meshgrid(np.arange(240.0), np.arange(250.0), indexing="ij"), axis=-1)
    cfg = AugmentConfig(crop_size=128, scale=scale)
    for seed in range(10):
        weak, strong = paired_views(image, np.random.default_rng(seed), cfg)
        geometry = sample_geometry(image.shape[:2], np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(weak, geometry.image(image).transpose(2, 0, 1) / np.float32(255))
        np.testing.assert_allclose(weak[:2].transpose(1, 2, 0) * 255, geometry.image(coords), atol=1e-3)
        assert not np.array_equal(weak, strong)


def test_strong_view_lines_up_with_weak_better_than_any_other_placement() -> None:
    """Under every photometric change (blur, noise, grey, stain, colour), the strong view correlates best with the
    weak view unshifted and unrotated: no shift of up to 3 pixels and no flip or turn matches as well."""
    rng = np.random.default_rng(5)
    image = np.full((220, 230, 3), 40, np.uint8)
    for _ in range(30):
        y, x = rng.integers(0, 210), rng.integers(0, 220)
        image[y : y + rng.integers(4, 10), x : x + rng.integers(4, 10)] = 230
    cfg = AugmentConfig(crop_size=128, scale=(0.8, 1.25), grey_prob=0.5, blur_prob=1.0)
    for seed in range(8):
        weak, strong = (v.mean(axis=0) for v in paired_views(image, np.random.default_rng(seed), cfg))
        scores = {
            (k, flip, dy, dx): np.corrcoef(
                weak.ravel(), np.roll(np.rot90(strong[:, ::-1] if flip else strong, k), (dy, dx), axis=(0, 1)).ravel()
            )[0, 1]
            for k in range(4)
            for flip in (False, True)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
        }
        assert max(scores, key=scores.get) == (0, False, 0, 0)
        assert scores[0, False, 0, 0] > 0.8


def test_labeled_view_instances_cover_exactly_the_nucleus_pixels() -> None:
    image, instances = blob_image(np.random.default_rng(0))
    cfg = AugmentConfig(crop_size=128, labeled_photometric=False)
    for seed in range(20):
        view, labels = labeled_view(image, instances, np.random.default_rng(seed), cfg)
        nucleus = np.all(np.round(view * 255).astype(np.uint8) == NUCLEUS[:, None, None], axis=0)
        np.testing.assert_array_equal(labels > 0, nucleus)
        assert labels.dtype == np.int32 and view.dtype == np.float32
        np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))  # sequential 0..K


def test_labeled_view_with_scaling_keeps_labels_on_the_nuclei() -> None:
    image, instances = blob_image(np.random.default_rng(1))
    cfg = AugmentConfig(crop_size=128, scale=(0.7, 1.4), labeled_photometric=False)
    for seed in range(10):
        view, labels = labeled_view(image, instances, np.random.default_rng(seed), cfg)
        nucleus = np.abs(view - NUCLEUS[:, None, None] / 255).max(axis=0) < 0.25
        fg = labels > 0
        assert (fg & nucleus).sum() / (fg | nucleus).sum() > 0.8
        assert set(np.unique(labels)) <= set(range(instances.max() + 1)) | {0}
        np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_labeled_photometry_changes_the_image_not_the_labels() -> None:
    image, instances = blob_image(np.random.default_rng(2))
    plain = AugmentConfig(crop_size=96, labeled_photometric=False)
    jittered = dataclasses.replace(plain, labeled_photometric=True)
    view_a, labels_a = labeled_view(image, instances, np.random.default_rng(3), plain)
    view_b, labels_b = labeled_view(image, instances, np.random.default_rng(3), jittered)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(view_a, view_b)


def test_small_images_are_mirror_padded_with_mirrored_nuclei_labelled_apart() -> None:
    image = np.full((100, 100, 3), 220, np.uint8)
    instances = np.zeros((100, 100), np.int32)
    instances[0:6, 40:50] = 1  # touches the top edge
    instances[50:60, 50:60] = 2
    image[instances > 0] = NUCLEUS
    cfg = AugmentConfig(crop_size=128, flip=False, rotate90=False, labeled_photometric=False)
    view, labels = labeled_view(image, instances, np.random.default_rng(0), cfg)
    assert view.shape == (3, 128, 128) and labels.shape == (128, 128)
    np.testing.assert_array_equal(view[:, 14:114, 14:114], image.transpose(2, 0, 1) / np.float32(255))
    nucleus = np.all(np.round(view * 255).astype(np.uint8) == NUCLEUS[:, None, None], axis=0)
    np.testing.assert_array_equal(labels > 0, nucleus)  # mirror copies in the padding are labelled too
    original, mirror = labels[16, 59], labels[11, 59]  # rows 14..19 are the nucleus, rows 8..13 its mirror
    assert original > 0 and mirror > 0 and original != mirror
    assert labels.max() == 2 + 1  # nucleus 1 gains one mirror copy; nucleus 2 is far from the border


def test_crop_drops_cut_away_nuclei_and_relabels() -> None:
    image, instances = blob_image(np.random.default_rng(4))
    cfg = AugmentConfig(crop_size=64, labeled_photometric=False)
    _, labels = labeled_view(image, instances, np.random.default_rng(0), cfg)
    assert 0 < labels.max() < instances.max()
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))


@pytest.mark.parametrize(("flip", "rotate90", "expected"), [(False, False, 1), (True, False, 4), (False, True, 4)])
def test_flip_and_rotation_switches(flip: bool, rotate90: bool, expected: int) -> None:
    image = coordinate_image(100, 100)
    cfg = AugmentConfig(crop_size=64, flip=flip, rotate90=rotate90, **NO_PHOTOMETRY)
    seen = {rigid_orientation(source_coords(paired_views(image, np.random.default_rng(s), cfg)[0])) for s in range(40)}
    assert len(seen) == expected
    if not rotate90:  # flips alone never swap the axes
        assert all(d[1] == 0 for d, _ in seen)


def test_views_are_deterministic_by_seed_and_in_range() -> None:
    image, instances = blob_image(np.random.default_rng(6))
    cfg = AugmentConfig(crop_size=96, scale=(0.8, 1.25))

    def views(seed: int) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng(seed)
        return paired_views(image, rng, cfg) + labeled_view(image, instances, rng, cfg)

    a, b, c = views(9), views(9), views(10)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    for x in (a[0], a[1], a[2]):
        assert x.dtype == np.float32 and x.shape == (3, 96, 96) and x.min() >= 0 and x.max() <= 1


def test_eval_view_is_the_plain_image() -> None:
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    view = eval_view(image)
    assert view.shape == (3, 30, 40) and view.dtype == np.float32 and view.flags.c_contiguous
    np.testing.assert_array_equal(np.round(view * 255).astype(np.uint8), image.transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("crop_size", 0),
        ("scale", (1.2, 0.8)),
        ("scale", (0, 1)),
        ("scale", (1.0,)),
        ("brightness", 1.5),
        ("contrast", -0.1),
        ("hue", 0.6),
        ("blur_prob", 2),
        ("blur_sigma", (2.0, 1.0)),
        ("noise_std", -1),
        ("grey_prob", -0.5),
        ("hed_sigma", 1.5),
        ("labeled_strength", 2),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_config_accepts_lists_from_yaml() -> None:
    cfg = AugmentConfig(scale=[0.8, 1.25], blur_sigma=[0, 1])
    assert cfg.scale == (0.8, 1.25) and cfg.blur_sigma == (0.0, 1.0)


def test_bad_inputs_raise() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        labeled_view(image, np.zeros((20, 21), np.int32), np.random.default_rng(0), AugmentConfig(crop_size=16))
    with pytest.raises(ValueError, match="uint8"):
        paired_views(image.astype(float), np.random.default_rng(0), AugmentConfig(crop_size=16))


def test_views_grid_layout_outlines_and_blank_panel_for_unlabeled() -> None:
    image, instances = blob_image(np.random.default_rng(7))
    cfg = AugmentConfig(crop_size=64)
    grid = views_grid([(image, instances), (image, None)], cfg, seed=0)
    step = 64 + 4
    assert grid.dtype == np.uint8 and grid.shape == (16 + 2 * step, len(COLUMNS) * step - 4, 3)
    labeled_panel = grid[16 : 16 + 64, step : step + 64]
    assert np.all(labeled_panel == (0, 255, 0), axis=-1).sum() > 20  # instance outlines drawn
    unlabeled_panel = grid[16 + step : 16 + step + 64, step : step + 64]
    assert np.all(unlabeled_panel == 200)
    np.testing.assert_array_equal(grid, views_grid([(image, instances), (image, None)], cfg, seed=0))
    assert not np.array_equal(grid, views_grid([(image, instances), (image, None)], cfg, seed=1))


STAIN_OFF_KNOBS = dict(stain_scale=0.9, stain_shift=0.5, stain_brightness=0.5, stain_gamma=0.5, stain_blur_prob=1.0)
STAIN_ZERO_KNOBS = dict(stain_scale=0, stain_shift=0, stain_brightness=0, stain_gamma=0, stain_blur_prob=0)


def test_the_stain_step_switched_off_leaves_every_view_as_before() -> None:
    image, instances = blob_image(np.random.default_rng(3))
    default, off = AugmentConfig(crop_size=96), AugmentConfig(crop_size=96, stain="none", **STAIN_OFF_KNOBS)
    for seed in range(5):
        for a, b in zip(
            labeled_view(image, instances, np.random.default_rng(seed), default),
            labeled_view(image, instances, np.random.default_rng(seed), off),
        ):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(
            paired_views(image, np.random.default_rng(seed), default),
            paired_views(image, np.random.default_rng(seed), off),
        ):
            np.testing.assert_array_equal(a, b)


def test_the_stain_step_recolours_the_labeled_view_only_and_zero_strength_is_identity() -> None:
    image, instances = blob_image(np.random.default_rng(4))
    off = AugmentConfig(crop_size=96)
    hed = dataclasses.replace(off, stain="hed")
    zero = dataclasses.replace(hed, **STAIN_ZERO_KNOBS)
    for seed in range(5):
        plain, labels = labeled_view(image, instances, np.random.default_rng(seed), off)
        jittered, jittered_labels = labeled_view(image, instances, np.random.default_rng(seed), hed)
        np.testing.assert_array_equal(jittered_labels, labels)
        assert np.abs(jittered - plain).max() > 0.02 and 0 <= jittered.min() and jittered.max() <= 1
        np.testing.assert_allclose(
            labeled_view(image, instances, np.random.default_rng(seed), zero)[0], plain, atol=1e-5
        )
        for a, b in zip(
            paired_views(image, np.random.default_rng(seed), off), paired_views(image, np.random.default_rng(seed), hed)
        ):
            np.testing.assert_array_equal(a, b)


def test_an_unknown_stain_augmentation_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="stain must be 'none' or 'hed'"):
        AugmentConfig(stain="strong")
