"""Synthetic H&E-like data: determinism, plausible stain colours, instance maps, the written dataset, data show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2hed

from cdcl.cli import main
from cdcl.data import load_dataset
from cdcl.data.synthetic import synthetic_tile, write_synthetic_dataset


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic_tile(seed) for seed in range(8)]


def test_tile_is_deterministic_by_seed() -> None:
    image, instances = synthetic_tile(11, 128)
    again = synthetic_tile(np.random.default_rng(11), 128)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(instances, again[1])
    assert not np.array_equal(image, synthetic_tile(12, 128)[0])


def test_tile_shapes_and_instance_ids(tiles: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, instances in tiles:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert instances.shape == (256, 256) and instances.dtype == np.int32
        np.testing.assert_array_equal(np.unique(instances), np.arange(instances.max() + 1))
        assert 10 <= instances.max() <= 45
        for k in range(1, instances.max() + 1):  # every nucleus is one piece of a reasonable size
            piece = instances == k
            assert piece.sum() >= 12 and ndi.label(piece)[1] == 1


def test_nuclei_vary_in_size_and_some_touch(tiles: list[tuple[np.ndarray, np.ndarray]]) -> None:
    radii = np.concatenate([np.sqrt(np.bincount(inst.ravel())[1:] / np.pi) for _, inst in tiles])
    assert radii.min() < 5 and radii.max() > 10
    touching = 0
    for _, inst in tiles:
        right = (inst[:, :-1] > 0) & (inst[:, 1:] > 0) & (inst[:, :-1] != inst[:, 1:])
        down = (inst[:-1] > 0) & (inst[1:] > 0) & (inst[:-1] != inst[1:])
        touching += int(right.any() or down.any())
    assert touching >= 4  # most tiles have touching nuclei with distinct ids


def test_colours_look_like_h_and_e(tiles: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for image, instances in tiles:
        nuclei, stroma = image[instances > 0].astype(float), image[instances == 0].astype(float)
        r, g, b = np.median(stroma, axis=0)
        assert g < r and g < b  # pink/purple stroma: green absorbed by eosin
        assert nuclei.mean() < stroma.mean() - 30  # nuclei are darker
        haem = rgb2hed(image)[..., 0]
        assert np.median(haem[instances > 0]) > 2 * np.median(haem[instances == 0])
        nb, nr = np.median(nuclei[:, 2]), np.median(nuclei[:, 0])
        assert nb > nr  # purple to dark blue nuclei


def test_a_single_grey_threshold_does_not_segment_the_nuclei(tiles: list[tuple[np.ndarray, np.ndarray]]) -> None:
    grey = np.concatenate([rgb2gray(image).ravel() for image, _ in tiles])
    truth = np.concatenate([(instances > 0).ravel() for _, instances in tiles])
    thresholds = np.quantile(grey, np.linspace(0.01, 0.5, 50))
    ious = [((grey < t) & truth).sum() / ((grey < t) | truth).sum() for t in thresholds]
    assert 0.3 < max(ious) < 0.75


def test_small_tiles_get_proportionally_fewer_nuclei() -> None:
    counts = [synthetic_tile(seed, 96)[1].max() for seed in range(6)]
    assert all(1 <= c <= 8 for c in counts)


def test_written_dataset_is_byte_identical_and_readable(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", 4, seed=3, size=64, masks_for=2)
    b = write_synthetic_dataset(tmp_path / "b", 4, seed=3, size=64, masks_for=2)
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == ["synth_000.png", "synth_001.png", "synth_002.png", "synth_003.png"]
    assert sorted(p.name for p in (a / "masks").iterdir()) == names[:2]
    for sub in ("images", "masks"):
        for p in (a / sub).iterdir():
            assert p.read_bytes() == (b / sub / p.name).read_bytes()
    mask = np.asarray(Image.open(a / "masks" / "synth_001.png"))
    assert mask.dtype == np.uint16
    np.testing.assert_array_equal(mask, synthetic_tile(np.random.default_rng([3, 1]), 64)[1])
    dataset = load_dataset(a, "folder")
    assert [item.instances is not None for item in dataset] == [True, True, False, False]
    assert not list(tmp_path.rglob("*.tmp"))


def test_rewriting_a_smaller_dataset_removes_leftovers(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, 3, size=48)
    write_synthetic_dataset(tmp_path, 2, size=48, masks_for=1)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["synth_000.png", "synth_001.png"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["synth_000.png"]


@pytest.mark.parametrize(("n", "masks_for"), [(0, None), (3, 4), (3, -1)])
def test_write_rejects_bad_counts(tmp_path: Path, n: int, masks_for: int | None) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path, n, masks_for=masks_for)


def test_data_show_writes_the_grid(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "data", 3, size=80, masks_for=2)
    out = tmp_path / "views.png"
    argv = [
        "data",
        "show",
        str(data),
        "--format",
        "folder",
        "--n",
        "2",
        "--set",
        "augment.crop_size=64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (16 + 2 * 68, 4 * 68 - 4, 3)
    first = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == first  # same seed, same picture


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "0", "--out", "x.png"], "--n must be >= 1"),
        (["--out", "x.jpg"], "must be a .png"),
        (["--set", "augment.brightness=3", "--out", "x.png"], "brightness"),
    ],
)
def test_data_show_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = write_synthetic_dataset(tmp_path / "data", 1, size=48)
    assert main(["data", "show", str(data), "--format", "folder", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
