"""``cdcl tiles``: unlabeled training tiles cut from slides of real MoNuSeg tissue."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from cdcl.cli import main
from cdcl.data.readers import load_dataset
from cdcl.data.splits import make_split
from cdcl.testing.slides import monuseg_mosaic, write_pyramid

from helpers.cli_cases import assert_ok, run_cdcl
from helpers.geojson import check_geojson
from helpers.training import tiny_overrides


@pytest.fixture(scope="module")
def mosaic(shared_data) -> np.ndarray:
    """1200 x 1000 px: MoNuSeg tissue inside a 100 px white margin."""
    return monuseg_mosaic(shared_data, 1200, 1000, margin=100)


def positions(folder, stem: str, settings: str = "256px") -> dict[tuple[int, int], np.ndarray]:
    """Tiles by the level-0 corner in their name."""
    found = {}
    for path in sorted(folder.glob(f"{stem}_x*_{settings}.png")):
        x, y = map(int, re.fullmatch(rf"{stem}_x(\d+)_y(\d+)_{settings}\.png", path.name).groups())
        found[x, y] = np.asarray(Image.open(path))
    return found


def test_tiles_are_tissue_crops_of_the_slide_named_by_their_level_0_corner(tmp_path, mosaic, caplog) -> None:
    slide = write_pyramid(tmp_path / "slide.tif", mosaic, mpp=0.25)
    out = tmp_path / "lab" / "images"
    args = ["tiles", str(slide), "--out", str(out), "--size", "256", "--per-slide", "4"]
    assert main(args) == 0
    tiles = positions(out, "slide")
    assert len(tiles) == 4
    for (x, y), pixels in tiles.items():
        np.testing.assert_array_equal(pixels, mosaic[y : y + 256, x : x + 256])  # lossless level 0, exact
        assert x % 256 == y % 256 == 0 and (pixels.min(axis=2) < 250).mean() >= 0.5  # mostly tissue, not margin

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO):
        assert main(args) == 0  # the same command again: the same tiles, none rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert "4 tiles (0 written now, 4 already there)" in caplog.text
    assert main([*args, "--seed", "1", "--per-slide", "9"]) == 0 and len(positions(out, "slide")) > 4
    assert main([*args, "--size", "128"]) == 0  # another size: other files, not those of 256 px counted again
    assert len(positions(out, "slide", "128px")) == 4 and all(
        p.shape == (128, 128, 3) for p in positions(out, "slide", "128px").values()
    )

    # the folder is the unlabeled half of a `folder` dataset beside one annotated image
    (tmp_path / "lab" / "masks").mkdir()
    Image.fromarray(mosaic[100:356, 100:356]).save(out / "annotated.png")
    Image.fromarray((mosaic[100:356, 100:356, 0] < 120).astype(np.uint8)).save(
        tmp_path / "lab" / "masks" / "annotated.png"
    )
    split = make_split(load_dataset(tmp_path / "lab", "folder"), 1.0, 0, val_fraction=0.0, test_fraction=0.0)
    assert split.labeled == ["annotated"] and len(split.unlabeled) == len(list(out.iterdir())) - 1


def test_tiles_at_a_coarser_resolution_come_from_the_matching_level(tmp_path, mosaic) -> None:
    slide = write_pyramid(tmp_path / "slide.tif", mosaic, mpp=0.25)
    assert main(["tiles", str(slide), "--out", str(tmp_path / "out"), "--tile-mpp", "0.5", "--per-slide", "10"]) == 0
    level1 = np.asarray(Image.fromarray(mosaic).reduce(2))  # the pyramid's 0.5 um/px level
    tiles = positions(tmp_path / "out", "slide", "256px_0.5um")
    assert sorted(tiles) == [(0, 0), (512, 0)]  # the only full 256 px cells of the 600 x 500 level, both >= 50% tissue
    for (x, y), pixels in tiles.items():
        np.testing.assert_array_equal(pixels, level1[y // 2 : y // 2 + 256, x // 2 : x // 2 + 256])


def test_a_slide_without_tissue_does_not_stop_the_others(tmp_path, mosaic, capsys) -> None:
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    write_pyramid(folder / "a.tif", mosaic[:, :600], mpp=0.25)
    write_pyramid(folder / "b.tif", np.full((600, 600, 3), 255, np.uint8), mpp=0.25)
    write_pyramid(folder / "c.tif", mosaic[:, 600:], mpp=0.25)
    assert main(["tiles", str(folder), "--out", str(out), "--per-slide", "3"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("cdcl tiles: error: 1 of 3 slides failed") and "b.tif: no tissue found" in last
    assert len(positions(out, "a")) == len(positions(out, "c")) == 3


def test_the_lab_recipe_runs_from_slides_and_annotated_tiles_to_nuclei_for_every_slide(
    tmp_path, shared_data, mosaic
) -> None:
    """The README's "your lab's data" commands, end to end on real MoNuSeg tissue: unlabeled tiles cut from two
    slides, annotated tiles beside them, split, a (very short) CDCL training, nuclei for both slides."""
    slides, lab = tmp_path / "slides", tmp_path / "lab"
    slides.mkdir()
    for name, crop in (("s1", mosaic[:500, :600]), ("s2", mosaic[500:, 600:])):
        write_pyramid(slides / f"{name}.tif", crop, mpp=0.25)
    for folder in ("images", "masks"):
        (lab / folder).mkdir(parents=True)
    train = shared_data / "monuseg" / "train"
    for i, path in enumerate(sorted((train / "images").glob("*.tif"))[:10]):  # 10 annotated 128 px tiles
        crop = np.s_[128 * (i % 4) : 128 * (i % 4) + 128, 128 * (i % 4) : 128 * (i % 4) + 128]
        Image.fromarray(np.asarray(Image.open(path).convert("RGB"))[crop]).save(lab / "images" / f"a{i}.png")
        Image.fromarray(np.asarray(Image.open(train / "masks" / f"{path.stem}.png"))[crop]).save(
            lab / "masks" / f"a{i}.png"
        )

    assert (
        main(
            [
                "tiles",
                str(slides),
                "--out",
                str(lab / "images"),
                "--tile-mpp",
                "0.25",
                "--size",
                "128",
                "--per-slide",
                "6",
            ]
        )
        == 0
    )
    assert (
        main(["split", str(lab), "--format", "folder", "--labeled", "1", "--seed", "0", "--out", str(lab / "split")])
        == 0
    )
    counts = {
        name: len((lab / "split" / f"{name}.txt").read_text().split())
        for name in ("labeled", "unlabeled", "val", "test")
    }
    assert counts == {"labeled": 7, "unlabeled": 12, "val": 1, "test": 2}

    config = tmp_path / "empty.yaml"
    config.write_text("# every value comes from --set\n")
    overrides = tiny_overrides(lab, lab / "split", "cdcl", 4, **{"data.mpp": 0.25, "infer.window": 128})
    assert_ok(
        run_cdcl("train", "--config", config, *[a for s in overrides for a in ("--set", s)], "--out", tmp_path / "run")
    )
    out = tmp_path / "nuclei"
    assert_ok(
        run_cdcl(
            "predict-wsi",
            "--checkpoint",
            tmp_path / "run" / "best.pt",
            slides,
            "--out",
            out,
            "--tile",
            "256",
            "--workers",
            "0",
            "--device",
            "cpu",
        )
    )
    for name in ("s1", "s2"):
        summary = json.loads((out / f"{name}_summary.json").read_text())
        assert summary["settings"]["checkpoint"]["path"] == str((tmp_path / "run" / "best.pt").resolve())
        assert summary["working_mpp"] == pytest.approx(0.25) and summary["tiles"]["tissue"] > 0
        assert len(check_geojson(out / f"{name}.geojson")["features"]) == summary["nuclei"]
