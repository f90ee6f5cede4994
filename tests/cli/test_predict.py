"""`cdcl predict` on files and folders, with a stand-in model in place of a trained checkpoint."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from cdcl.cli import main
from cdcl.testing.slides import stand_in_predictor

from helpers.geojson import check_geojson


@pytest.fixture
def stand_in(monkeypatch) -> None:
    """`load_predictor` returns the stand-in (dark pixels are nuclei) whatever the checkpoint path."""
    monkeypatch.setattr(
        "cdcl.commands.predict.load_predictor",
        lambda path, device, batch_size, tta: stand_in_predictor(batch_size=batch_size or 4, tta=tta or "none"),
    )


@pytest.fixture
def inputs(tmp_path, shared_data):
    """A folder with a real MoNuSeg crop, a synthetic image of 3 known discs and a stray text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    source = sorted((shared_data / "monuseg" / "train" / "images").glob("*.tif"))[0]
    Image.open(source).convert("RGB").crop((0, 0, 300, 260)).save(folder / "tissue.png")
    discs = np.full((150, 200, 3), 235, np.uint8)
    for centre in [(30, 40), (80, 120), (120, 50)]:
        discs[disk(centre, 10)] = (80, 30, 110)
    Image.fromarray(discs).save(folder / "discs.tif")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_writes_every_format_per_image(tmp_path, inputs, stand_in, caplog) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(
            [
                "predict",
                "--checkpoint",
                "model.pt",
                str(inputs),
                "--out",
                str(out),
                "--formats",
                "labels,labels-tiff,geojson,csv,overlay",
            ]
        )
    assert code == 0
    assert "notes.txt" in caplog.text  # skipped with a warning
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}{suffix}"
        for stem in ("discs", "tissue")
        for suffix in ("_labels.png", "_labels.tif", ".geojson", "_nuclei.csv", "_overlay.png")
    )
    labels = np.asarray(Image.open(out / "discs_labels.png"))
    assert labels.shape == (150, 200) and len(np.unique(labels[labels > 0])) == 3
    with open(out / "discs_nuclei.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((float(r["centroid_x"]), float(r["centroid_y"])) for r in rows) == [
        (40.5, 30.5),
        (50.5, 120.5),
        (120.5, 80.5),
    ]
    assert all(float(r["area"]) == len(disk((50, 50), 10)[0]) for r in rows)
    for stem in ("discs", "tissue"):
        features = check_geojson(out / f"{stem}.geojson")["features"]
        with open(out / f"{stem}_nuclei.csv", newline="") as fh:
            assert len(features) == len(list(csv.DictReader(fh))) > 0
    overlay = np.asarray(Image.open(out / "tissue_overlay.png"))
    assert overlay.shape == (260, 300, 3)


def test_formats_subset_and_single_files(tmp_path, inputs, stand_in) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                "m.pt",
                str(inputs / "discs.tif"),
                "--out",
                str(out),
                "--formats",
                "csv",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert [p.name for p in out.iterdir()] == ["discs_nuclei.csv"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("duplicate", "share the name"),
        ("missing", "no such file or folder"),
        ("unreadable", "unreadable.png"),
        ("formats", "unknown --formats"),
        ("out_is_file", "cannot create output folder"),
        ("empty_folder", "no images in folder"),
        ("mpp_zero", "--mpp must be between 0.01 and 50.0"),
        ("mpp_huge", "--mpp must be between 0.01 and 50.0"),
        ("mpp_too_coarse", "more than 4x coarser than the model's 0.25"),
        ("mpp_auto_without_size", "--mpp auto needs the training nucleus size"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, inputs, stand_in, capsys, case, message) -> None:
    out, extra = tmp_path / "out", []
    args = [str(inputs)]
    if case == "duplicate":
        other = tmp_path / "other"
        other.mkdir()
        Image.open(inputs / "tissue.png").save(other / "tissue.jpg")
        args.append(str(other))
    elif case == "missing":
        args = [str(tmp_path / "nope")]
    elif case == "unreadable":
        (inputs / "unreadable.png").write_text("this is not a PNG")
    elif case == "formats":
        extra = ["--formats", "labels,shapefile"]
    elif case == "out_is_file":
        out.write_text("a file")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args = [str(tmp_path / "empty")]
    elif case.startswith("mpp"):
        extra = ["--mpp", {"mpp_zero": "0", "mpp_huge": "60", "mpp_too_coarse": "1.2"}.get(case, "auto")]
    code = main(["predict", "--checkpoint", "m.pt", *args, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_summary_lines_are_reported(tmp_path, inputs, stand_in, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert main(["predict", "--checkpoint", "m.pt", str(inputs / "discs.tif"), "--out", str(tmp_path / "o")]) == 0
    assert "1 image(s), 3 nuclei" in caplog.text
    assert json.loads((tmp_path / "o" / "discs.geojson").read_text())["type"] == "FeatureCollection"


def test_mpp_predicts_at_the_model_resolution_and_writes_the_image_size(tmp_path, inputs, stand_in) -> None:
    """Discs at 0.5 um/px for the stand-in's 0.25: predicted enlarged 2x, written at the image's 150 x 200 px."""
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    for out, extra in ((plain, []), (scaled, ["--mpp", "0.5"])):
        args = ["predict", "--checkpoint", "m.pt", str(inputs / "discs.tif"), "--out", str(out), "--formats", "labels"]
        assert main([*args, *extra]) == 0
    a, b = (np.asarray(Image.open(folder / "discs_labels.png")) for folder in (plain, scaled))
    assert a.shape == b.shape == (150, 200) and a.max() == b.max() == 3
    assert np.mean((a > 0) != (b > 0)) < 0.01


def test_tta_reaches_the_predictor(tmp_path, inputs, monkeypatch) -> None:
    made = []
    monkeypatch.setattr(
        "cdcl.commands.predict.load_predictor",
        lambda path, device, batch_size, tta: made.append(stand_in_predictor(tta=tta)) or made[-1],
    )
    out = tmp_path / "out"
    assert (
        main(["predict", "--checkpoint", "m.pt", str(inputs / "discs.tif"), "--out", str(out), "--tta", "flips"]) == 0
    )
    assert [p.tta for p in made] == ["flips"] and len(list(out.glob("discs*"))) == 4
