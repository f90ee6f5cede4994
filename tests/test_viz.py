"""Overlays, PNG writing and figures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdcl.errors import CdclError
from cdcl.io import save_png
from cdcl.viz import overlay_contours, plot_comparison_grid, plot_training_curves, to_rgb_uint8

GREEN, YELLOW = (0, 255, 0), (255, 255, 0)


def two_squares() -> np.ndarray:
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[2:7, 2:6] = 4  # columns 2-5
    labels[2:7, 6:10] = 9  # columns 6-9, touching 4
    return labels


def test_overlay_draws_outlines_and_the_line_between_touching_nuclei():
    image = np.full((10, 12), 100, dtype=np.uint8)
    out = overlay_contours(image, [(two_squares(), GREEN)])
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    green = np.all(out == GREEN, axis=2)
    expected = np.zeros((10, 12), dtype=bool)
    expected[2:7, 2:10] = True
    expected[3:6, 3:5] = False  # interior of nucleus 4
    expected[3:6, 7:9] = False  # interior of nucleus 9
    assert np.array_equal(green, expected)
    assert np.all(out[~green] == 100)
    assert np.all(image == 100)  # input untouched


def test_overlay_thickness_and_layer_order():
    labels = two_squares()
    out = overlay_contours(np.zeros((10, 12, 3), np.uint8), [(labels, GREEN), (labels, YELLOW)], thickness=2)
    yellow = np.all(out == YELLOW, axis=2)
    assert yellow.sum() == (labels > 0).sum()  # 5x4 squares: a 2-pixel rim leaves no interior
    assert not np.all(out == GREEN, axis=2).any()
    with pytest.raises(ValueError, match="does not match"):
        overlay_contours(np.zeros((5, 5), np.uint8), [(labels, GREEN)])


def test_to_rgb_uint8_stretches_non_uint8():
    grey = np.array([[1.0, 2.0], [5.0, 1.0]])  # (2 - 1) / 4 * 255 = 63.75
    assert np.array_equal(to_rgb_uint8(grey)[..., 1], [[0, 64], [255, 0]])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 7
    assert to_rgb_uint8(rgba).shape == (2, 2, 3) and to_rgb_uint8(rgba)[0, 0, 0] == 7


def test_save_png_round_trips(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "rgb.png", rgb)
    assert np.array_equal(np.array(Image.open(tmp_path / "rgb.png")), rgb)
    labels = np.array([[0, 1, 65535], [300, 0, 2]], dtype=np.int32)
    save_png(tmp_path / "labels.png", labels)
    back = np.array(Image.open(tmp_path / "labels.png"))
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    save_png(tmp_path / "mask.png", labels > 0)
    assert np.array_equal(np.array(Image.open(tmp_path / "mask.png")), (labels > 0) * 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.png", "mask.png", "rgb.png"]


def test_save_png_refuses_what_a_png_cannot_hold(tmp_path):
    with pytest.raises(CdclError, match="16-bit PNG") as err:
        save_png(tmp_path / "big.png", np.array([[0, 70000]], dtype=np.int64))
    assert "big.png" in str(err.value)
    with pytest.raises(ValueError):
        save_png(tmp_path / "float.png", np.zeros((3, 3)))
    assert list(tmp_path.iterdir()) == []


def test_training_curves_one_panel_per_group(tmp_path):
    records = [
        {"iteration": i, "loss/total": 1 / (i + 1), "loss/sup": 0.5 / (i + 1), "lr": 0.01, "images_per_s": 20.0}
        for i in range(50)
    ]
    records[10]["val/dice"] = 0.5
    records[40]["val/dice"] = 0.7
    plot_training_curves(records, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (800, 1040)  # 4 panels x 2.6 in x 100 dpi
    plot_training_curves([r for r in records if "val/dice" not in r], tmp_path / "no_val.png")
    assert Image.open(tmp_path / "no_val.png").size == (800, 780)
    plot_training_curves([], tmp_path / "empty.png")
    assert Image.open(tmp_path / "empty.png").size == (800, 260)


def test_comparison_grid(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    gt = np.zeros((40, 40), dtype=np.int32)
    gt[10:20, 10:20] = 1
    prob = gt.astype(np.float32) * 0.8
    plot_comparison_grid(image, [("ground truth", gt), ("probability", prob), ("overlay", image)], tmp_path / "g.png")
    picture = np.array(Image.open(tmp_path / "g.png").convert("RGB"))
    assert picture.shape[1] == 4 * 350
    assert np.all(picture == YELLOW, axis=2).sum() > 30  # the outline of the GT square
