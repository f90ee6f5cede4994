"""Whole-slide prediction: readers, level choice, tissue mask, seams, resume, CLI and bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import shapely.geometry
import torch
from PIL import Image

import cdcl.commands.predict_wsi
import cdcl.wsi.job
import cdcl.wsi.pipeline
from cdcl.cli import main
from cdcl.data.stain import StainNormalizer, fit_reference
from cdcl.errors import CdclError
from cdcl.testing.slides import DISCS, RADIUS, disc_image, monuseg_mosaic, stand_in_predictor, write_pyramid
from cdcl.wsi.cohort import HISTOGRAM, TABLE
from cdcl.wsi.journal import Journal
from cdcl.wsi.pipeline import predict_slide
from cdcl.wsi.readers import ArrayReader, choose_level, open_slide, tissue_mask

from helpers.geojson import check_geojson

COHORT_FILES = (TABLE, HISTOGRAM)  # written by every predict-wsi run


def read_csv(path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def disc_slide() -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    return disc_image()


@pytest.fixture(scope="module")
def mosaic(shared_data) -> np.ndarray:
    """Real H&E (MoNuSeg tiles) in a white margin: 1200 x 1000 px."""
    return monuseg_mosaic(shared_data, 1200, 1000, margin=100)


@pytest.fixture
def checkpoint(tmp_path, monkeypatch) -> str:
    """A checkpoint path whose "loading" gives the stand-in predictor (dark pixels are nuclei)."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(
        "cdcl.commands.predict_wsi.load_predictor",
        lambda path, device, batch_size, tta: stand_in_predictor(
            window=256, batch_size=batch_size or 4, tta=tta or "none"
        ),
    )
    return str(path)


def run_seam_slide(disc_slide, out, **kwargs) -> dict:
    image, _ = disc_slide
    return predict_slide(
        stand_in_predictor(),
        ArrayReader(image, mpp=0.25),
        out,
        stem="discs",
        tile=128,
        halo=32,
        **{"workers": 0, **kwargs},
    )


def test_seam_nuclei_come_out_once_and_whole(tmp_path, disc_slide) -> None:
    summary = run_seam_slide(disc_slide, tmp_path)
    rows = read_csv(tmp_path / "discs_nuclei.csv")
    np.testing.assert_allclose(
        sorted((r["centroid_x"], r["centroid_y"], r["area"]) for r in rows), disc_slide[1], atol=1e-3
    )
    assert [r["id"] for r in rows] == list(range(1, len(DISCS) + 1))
    assert summary["nuclei"] == len(DISCS)
    assert summary["tiles"]["tissue"] < summary["tiles"]["grid"] == 16  # white tiles skipped
    features = check_geojson(tmp_path / "discs.geojson")["features"]
    for feature, row in zip(features, rows):
        shape = shapely.geometry.shape(feature["geometry"])
        assert row["area"] - 10 < shape.area <= row["area"]
        assert (shape.centroid.x, shape.centroid.y) == pytest.approx((row["centroid_x"], row["centroid_y"]), abs=0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "discs.geojson",
        "discs_nuclei.csv",
        "discs_overlay.png",
        "discs_summary.json",
    ]


def test_slides_get_test_time_augmentation(tmp_path, disc_slide) -> None:
    """The stand-in is pointwise, so flips and rotations of every window change nothing: the same nuclei."""
    image, _ = disc_slide
    for tta in ("none", "dihedral"):
        predict_slide(
            stand_in_predictor(tta=tta),
            ArrayReader(image, mpp=0.25),
            tmp_path / tta,
            stem="d",
            tile=128,
            halo=32,
            workers=0,
        )
    plain, augmented = (read_csv(tmp_path / tta / "d_nuclei.csv") for tta in ("none", "dihedral"))
    assert len(plain) == len(DISCS) and augmented == plain


def test_two_slides_share_an_output_folder(tmp_path, disc_slide) -> None:
    image, _ = disc_slide
    for stem, crop in (("left", image[:, :256]), ("right", image[:, 256:])):
        predict_slide(
            stand_in_predictor(), ArrayReader(crop, mpp=0.25), tmp_path, stem=stem, tile=128, halo=32, workers=0
        )
    left, right = (json.loads((tmp_path / f"{s}_summary.json").read_text()) for s in ("left", "right"))
    assert left["nuclei"] + right["nuclei"] > 0 and left["level0_size"][0] == image.shape[1] - right["level0_size"][0]
    assert {p.suffix for p in tmp_path.iterdir()} == {".geojson", ".csv", ".png", ".json"} and len(
        list(tmp_path.iterdir())
    ) == 8


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, disc_slide) -> None:
    """Both would append the same tiles to one journal: each nucleus would be listed twice."""
    import fcntl

    with open(tmp_path / ".discs.lock", "a") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            CdclError, match="another cdcl predict-wsi is writing the outputs of 'discs' in this folder"
        ):
            run_seam_slide(disc_slide, tmp_path)
    assert not (tmp_path / "discs.partial").exists()
    assert run_seam_slide(disc_slide, tmp_path)["nuclei"] == len(DISCS)  # once it is released
    assert not (tmp_path / ".discs.lock").exists()


@pytest.mark.parametrize("shared_memory", [True, False])
def test_worker_processes_give_the_same_result(tmp_path, disc_slide, monkeypatch, caplog, shared_memory) -> None:
    """Inline, and with workers fed through shared memory or (a full /dev/shm) through the pool's pipe."""
    image, _ = disc_slide
    predict_slide(
        stand_in_predictor(), ArrayReader(image, mpp=0.25), tmp_path / "a", stem="discs", tile=128, halo=32, workers=0
    )
    monkeypatch.setattr(cdcl.wsi.pipeline, "shared_memory_fits", lambda total: shared_memory)
    with caplog.at_level(logging.INFO, logger="cdcl.wsi.pipeline"):
        predict_slide(
            stand_in_predictor(),
            ArrayReader(image, mpp=0.25),
            tmp_path / "b",
            stem="discs",
            tile=128,
            halo=32,
            workers=2,
        )
    assert ("through a pipe" in caplog.text) is not shared_memory
    for name in ("discs.geojson", "discs_nuclei.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_coordinates_are_level_0_pixels_when_a_coarser_level_is_used(tmp_path, disc_slide) -> None:
    """The model was trained at 0.5 um/px, the slide is 0.25: level 1 is read; outputs stay in level-0 px."""
    image, expected = disc_slide
    big = np.kron(image, np.ones((2, 2, 1), np.uint8))  # the same slide at twice the resolution
    reader = ArrayReader(big, mpp=0.25)
    summary = predict_slide(stand_in_predictor(mpp=0.5), reader, tmp_path, stem="big", tile=128, halo=32, workers=0)
    assert summary["level"] == 1 and summary["working_mpp"] == 0.5
    rows = read_csv(tmp_path / "big_nuclei.csv")
    got = sorted((r["centroid_x"], r["centroid_y"], r["area"]) for r in rows)
    np.testing.assert_allclose(got, [(2 * x, 2 * y, 4 * a) for x, y, a in expected], atol=1e-3)
    for feature in check_geojson(tmp_path / "big.geojson")["features"]:
        assert shapely.geometry.shape(feature["geometry"]).bounds[2] <= big.shape[1]


def test_interrupted_run_resumes_to_the_same_files(tmp_path, disc_slide, monkeypatch) -> None:
    run_seam_slide(disc_slide, tmp_path / "whole")
    out = tmp_path / "resumed"
    append = Journal.append
    calls = []

    def append_then_die(self, index, nuclei):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(index)
        append(self, index, nuclei)

    monkeypatch.setattr(Journal, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_seam_slide(disc_slide, out)
    assert sorted(p.name for p in out.iterdir()) == ["discs.partial"]  # no final file that looks complete
    with open(out / "discs.partial" / "tiles.jsonl", "a") as fh:
        fh.write('{"tile": 99, "nuclei": [[{"id"')  # a line cut by the kill
    monkeypatch.setattr(Journal, "append", append)
    summary = run_seam_slide(disc_slide, out)
    assert summary["tiles"]["resumed"] == 3 and summary["tiles"]["predicted_now"] == summary["tiles"]["tissue"] - 3
    for name in ("discs.geojson", "discs_nuclei.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (out / "discs.partial").exists()


def test_an_interrupted_run_with_workers_leaves_no_shared_memory(tmp_path, disc_slide, monkeypatch) -> None:
    """Tiles in flight sit in shared-memory blocks; an interrupt (Ctrl-C) removes them all the same."""
    before = set(os.listdir("/dev/shm"))
    append = Journal.append

    def append_then_die(self, index, nuclei):
        if self.finished:
            raise KeyboardInterrupt
        append(self, index, nuclei)

    monkeypatch.setattr(Journal, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_seam_slide(disc_slide, tmp_path, workers=2)
    assert not {name for name in set(os.listdir("/dev/shm")) - before if name.startswith("psm_")}


def test_changed_settings_restart_cleanly(tmp_path, disc_slide) -> None:
    journal = Journal(tmp_path / "x.partial", {"tile": 128})
    journal.append(0, "[]")
    assert Journal(tmp_path / "x.partial", {"tile": 128}).finished == {0}
    assert Journal(tmp_path / "x.partial", {"tile": 256}).finished == set()
    assert (tmp_path / "x.partial" / "tiles.jsonl").read_text() == ""
    Journal(tmp_path / "x.partial", {"tile": 128}).append(3, "[]")
    (tmp_path / "x.partial" / "tiles.jsonl").write_text('{"tile": 3, "nu\n')  # damaged, not just cut
    assert Journal(tmp_path / "x.partial", {"tile": 128}).finished == set()


def test_choose_level_prefers_the_closest_level_without_upsampling() -> None:
    reader = ArrayReader(np.zeros((1024, 1024, 3), np.uint8), mpp=0.25)  # levels at 0.25, 0.5, 1.0, 2.0
    assert reader.level_downsamples == (1.0, 2.0, 4.0)
    assert choose_level(reader, 0.25) == (0, 1.0)
    assert choose_level(reader, 0.5) == (1, 1.0)
    assert choose_level(reader, 0.53) == (1, 1.0)  # within 10%: no resizing
    assert choose_level(reader, 0.7) == (1, pytest.approx(1.4))  # read 0.5 um/px, shrink by 1.4
    assert choose_level(reader, 4.0) == (2, pytest.approx(4.0))
    assert choose_level(reader, 0.125) == (0, pytest.approx(0.5))  # finer than the slide: upsample level 0
    assert choose_level(reader, None) == (0, 1.0)


def test_resized_working_resolution_keeps_level_0_coordinates(tmp_path, disc_slide) -> None:
    image, expected = disc_slide
    summary = predict_slide(
        stand_in_predictor(mpp=0.35), ArrayReader(image, mpp=0.25), tmp_path, stem="r", tile=128, halo=32, workers=0
    )
    assert summary["level"] == 0 and summary["level0_px_per_working_px"] == pytest.approx(1.4)
    rows = sorted((r["centroid_x"], r["centroid_y"], r["area"]) for r in read_csv(tmp_path / "r_nuclei.csv"))
    assert len(rows) == len(expected)
    for (x, y, area), (ex, ey, earea) in zip(rows, expected):
        assert abs(x - ex) < 1 and abs(y - ey) < 1 and area == pytest.approx(earea, rel=0.1)


def test_tissue_mask_keeps_tissue_and_skips_background(mosaic) -> None:
    mask = tissue_mask(mosaic)
    assert mask[100:-100, 100:-100].mean() > 0.9
    assert mask[:90].mean() == mask[:, :90].mean() == 0
    for blank in (
        np.full((50, 60, 3), 255, np.uint8),
        np.zeros((50, 60, 3), np.uint8),
        np.full((50, 60, 3), 180, np.uint8),
    ):
        with pytest.raises(CdclError, match="no tissue"):
            tissue_mask(blank, "blank.svs")


def test_pyramidal_tiff_reads_through_openslide_with_its_mpp(tmp_path, mosaic) -> None:
    path = write_pyramid(tmp_path / "slide.tif", mosaic, mpp=0.25)
    reader = open_slide(path)
    assert reader.backend == "openslide"
    assert reader.mpp == pytest.approx(0.25)
    assert reader.dimensions == (1200, 1000) and reader.level_dimensions == ((1200, 1000), (600, 500))
    np.testing.assert_array_equal(reader.read_region(0, 1100, 900, 200, 150)[:100, :100], mosaic[900:, 1100:])
    assert (reader.read_region(0, 1100, 900, 200, 150)[100:] == 255).all()  # outside the slide: white
    np.testing.assert_array_equal(
        reader.read_region(1, 10, 20, 30, 40), ArrayReader(mosaic, 0.25).read_region(1, 10, 20, 30, 40)
    )
    assert open_slide(path, mpp_override=0.5).mpp == 0.5
    assert reader.reopen().read_region(0, 0, 0, 5, 5).shape == (5, 5, 3)
    assert max(reader.thumbnail(256).shape[:2]) == 256


def test_a_large_level_is_shrunk_to_a_thumbnail_piece_by_piece(tmp_path, mosaic, monkeypatch) -> None:
    """A slide without small levels must not be decoded whole (OpenSlide's get_thumbnail would): same picture,
    reads no larger than a chunk."""
    reader = open_slide(write_pyramid(tmp_path / "slide.tif", mosaic, mpp=0.25))
    whole = reader.thumbnail(256)
    reads = []
    read_region = reader.read_region
    monkeypatch.setattr(reader, "read_region", lambda *args: reads.append(args[3] * args[4]) or read_region(*args))
    monkeypatch.setattr("cdcl.wsi.readers.THUMBNAIL_CHUNK", 128)  # level 1 (600x500) is now "large"
    pieces = reader.thumbnail(256)
    assert len(reads) == 20 and max(reads) <= 128 * 128
    assert pieces.shape == whole.shape == (213, 256, 3)
    assert np.abs(pieces.astype(int) - whole).mean() < 4
    assert (tissue_mask(pieces) == tissue_mask(whole)).mean() > 0.99


def test_plain_tiff_falls_back_to_tiffslide_and_needs_mpp(tmp_path, shared_data) -> None:
    source = sorted((shared_data / "monuseg" / "train" / "images").glob("*.tif"))[0]  # strips, no resolution
    with pytest.raises(CdclError, match="pass --mpp"):
        open_slide(source)
    reader = open_slide(source, mpp_override=0.25)
    assert reader.backend == "tiffslide" and reader.dimensions == (1000, 1000)
    region = reader.read_region(0, 900, 950, 200, 100)
    np.testing.assert_array_equal(region[:50, :100], np.asarray(Image.open(source).convert("RGB"))[950:, 900:])
    assert (region[50:] == 255).all() and (region[:, 100:] == 255).all()  # outside the slide: white, not black


def test_predict_wsi_cli_on_a_monuseg_pyramid(tmp_path, mosaic, checkpoint, caplog) -> None:
    slide = write_pyramid(tmp_path / "mono.tif", mosaic, mpp=0.25, compression="jpeg")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(
            [
                "predict-wsi",
                "--checkpoint",
                checkpoint,
                str(slide),
                "--out",
                str(out),
                "--tile",
                "512",
                "--workers",
                "0",
            ]
        )
    assert code == 0
    summary = json.loads((out / "mono_summary.json").read_text())
    assert summary["tiles"]["grid"] == summary["tiles"]["tissue"] == 6  # 100 px margins: every tile has tissue
    assert summary["nuclei"] > 300 and summary["megapixels_per_s"] > 0
    features = check_geojson(out / "mono.geojson")["features"]
    assert len(features) == summary["nuclei"] == len(read_csv(out / "mono_nuclei.csv"))
    xs = [x for f in features for x, _ in f["geometry"]["coordinates"][0]]
    assert 90 < min(xs) and max(xs) < 1110  # nuclei only inside the tissue, in level-0 px
    assert f"{summary['nuclei']} nuclei" in caplog.text


def test_predict_wsi_takes_a_folder_of_slides_and_skips_the_finished_ones(tmp_path, mosaic, checkpoint, caplog) -> None:
    """A lab's batch: one command for a folder; re-running it after an interruption redoes only what is unfinished."""
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    for stem, crop in (("left", mosaic[:, :600]), ("right", mosaic[:, 600:])):
        write_pyramid(folder / f"{stem}.tif", crop, mpp=0.25)
    (folder / "notes.txt").write_text("scanned 2026-11-26\n")
    args = [
        "predict-wsi",
        "--checkpoint",
        checkpoint,
        str(folder),
        "--out",
        str(out),
        "--tile",
        "256",
        "--workers",
        "0",
    ]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "skipping" in caplog.text and "notes.txt" in caplog.text and "slide 2 of 2" in caplog.text
    summaries = {stem: json.loads((out / f"{stem}_summary.json").read_text()) for stem in ("left", "right")}
    assert all(
        s["nuclei"] > 100 and s["tiles"]["predicted_now"] == s["tiles"]["tissue"] > 0 for s in summaries.values()
    )
    assert summaries["left"]["settings"]["slide"]["path"] == str((folder / "left.tif").resolve())
    assert "2 slides, %d nuclei" % sum(s["nuclei"] for s in summaries.values()) in caplog.text
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(written) == sorted(
        [*(f"{stem}{suffix}" for stem in ("left", "right") for suffix in cdcl.wsi.pipeline.OUTPUTS), *COHORT_FILES]
    )

    # journals as left by a run killed between writing its summary and removing them: the right slide's, with
    # the same settings, goes; one of another tiling, still resumable, stays
    for stem, tile in (("right", 256), ("left", 512)):
        (out / f"{stem}.partial").mkdir()
        (out / f"{stem}.partial" / "run.json").write_text(
            json.dumps({**summaries[stem]["settings"], "tile": tile, "tiles": []})
        )
    os.utime(folder / "left.tif", ns=(1, 1))  # the left slide is replaced: its old outputs no longer apply
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "right.tif: already done" in caplog.text and "left.tif: already done" not in caplog.text
    assert (out / "right_nuclei.csv").stat().st_mtime_ns == written["right_nuclei.csv"]  # not rewritten
    assert (out / "left_nuclei.csv").stat().st_mtime_ns > written["left_nuclei.csv"]
    assert (
        not (out / "right.partial").exists() and not (out / "left.partial").exists()
    )  # the left one: restarted, then done


def test_a_slide_that_fails_midway_does_not_stop_the_others(tmp_path, mosaic, checkpoint, capsys) -> None:
    """Opening and resolution are checked before the batch starts; no tissue is only found at the slide's turn."""
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    write_pyramid(folder / "a.tif", mosaic[:, :600], mpp=0.25)
    write_pyramid(folder / "b.tif", np.full((600, 600, 3), 255, np.uint8), mpp=0.25)  # blank: no tissue
    write_pyramid(folder / "c.tif", mosaic[:, 600:], mpp=0.25)
    args = [
        "predict-wsi",
        "--checkpoint",
        checkpoint,
        str(folder),
        "--out",
        str(out),
        "--tile",
        "256",
        "--workers",
        "0",
    ]
    for _ in range(2):  # the re-run skips a and c and fails on b again
        assert main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("cdcl predict-wsi: error: 1 of 3 slides failed") and "b.tif: no tissue found" in last
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [*(f"{s}{x}" for s in "ac" for x in cdcl.wsi.pipeline.OUTPUTS), "b_failed.json", *COHORT_FILES]
        )
        statuses = [(row["slide"], row["status"]) for row in csv.DictReader(open(out / "cohort.csv"))]
        assert statuses == [("a", "finished"), ("b", "failed"), ("c", "finished")]


def test_a_summary_only_vouches_for_outputs_of_its_own_run(tmp_path, mosaic, checkpoint, monkeypatch, caplog) -> None:
    """A run with other settings stopped before it writes any output leaves the finished run skippable; one killed
    after writing its GeoJSON, CSV and overlay but before its summary must not leave the first run's summary
    vouching for the new files."""
    slide, out = write_pyramid(tmp_path / "s.tif", mosaic, mpp=0.25), tmp_path / "out"
    args = ["predict-wsi", "--checkpoint", checkpoint, str(slide), "--out", str(out), "--workers", "0"]
    assert main([*args, "--tile", "256"]) == 0
    finished = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # a run of other settings stopped before it replaced any output...
        patch.setattr(cdcl.wsi.pipeline, "_predict_tiles", interrupted)
        assert main([*args, "--tile", "512"]) == 130
    with caplog.at_level(logging.INFO):  # ...leaves the finished run finished, and its own journal resumable
        assert main([*args, "--tile", "256"]) == 0
    assert "already done" in caplog.text and (out / "s.partial").is_dir()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished

    write_json = cdcl.wsi.pipeline.write_json_atomic

    def killed_before_the_summary(path, obj):
        if path.name.endswith("_summary.json"):
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(cdcl.wsi.pipeline, "write_json_atomic", killed_before_the_summary)
    assert main([*args, "--tile", "512", "--halo", "0"]) == 130  # interrupted
    assert not (out / "s_summary.json").exists() and (out / "s.geojson").exists()
    monkeypatch.setattr(cdcl.wsi.pipeline, "write_json_atomic", write_json)
    assert main([*args, "--tile", "256"]) == 0  # predicted again, not "already done"
    summary = json.loads((out / "s_summary.json").read_text())
    assert summary["tile"] == 256 and summary["nuclei"] == len(check_geojson(out / "s.geojson")["features"])


def test_every_slide_of_a_batch_records_the_checkpoint_that_predicted_it(
    tmp_path, mosaic, checkpoint, monkeypatch
) -> None:
    """A checkpoint rewritten during a batch (training still saving best.pt) must not be named by later slides."""
    for stem in ("a", "b"):
        write_pyramid(tmp_path / f"{stem}.tif", mosaic[:300, :300], mpp=0.25)
    keys = []

    def predict_slide(*args, run_key, **kwargs):
        keys.append(run_key["checkpoint"])
        with open(checkpoint, "ab") as fh:  # rewritten while this slide is predicted
            fh.write(b" and more")
        return {"slide": "x", "nuclei": 0, "tiles": {"tissue": 0}, "seconds": 0.0, "megapixels_per_s": None}

    monkeypatch.setattr(cdcl.wsi.job, "predict_slide", predict_slide)
    size = os.path.getsize(checkpoint)
    assert (
        main(
            [
                "predict-wsi",
                "--checkpoint",
                checkpoint,
                str(tmp_path / "a.tif"),
                str(tmp_path / "b.tif"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert [key["bytes"] for key in keys] == [size, size]


def test_the_resume_key_holds_the_device_and_precision(tmp_path, mosaic, checkpoint, monkeypatch) -> None:
    """A run resumed on another device or precision starts over instead of mixing tiles computed both ways."""
    slide = write_pyramid(tmp_path / "mono.tif", mosaic, mpp=0.25)
    keys = []

    def predict_slide(*args, run_key, **kwargs):
        keys.append(run_key)
        return {"slide": "x", "nuclei": 0, "tiles": {"tissue": 0}, "seconds": 0.0, "megapixels_per_s": None}

    monkeypatch.setattr(cdcl.wsi.job, "predict_slide", predict_slide)
    assert (
        main(["predict-wsi", "--checkpoint", checkpoint, str(slide), "--out", str(tmp_path / "out"), "--device", "cpu"])
        == 0
    )
    assert keys[0]["device"] == "cpu" and keys[0]["amp"] is False and keys[0]["mpp"] == pytest.approx(0.25)
    assert keys[0]["tta"] == "none"


@pytest.mark.parametrize(
    "case,message",
    [
        ("unreadable", "cannot read slide"),
        ("no_mpp", "pass --mpp"),
        ("blank", "no tissue found"),
        ("unwritable", "cannot create output folder"),
        ("missing", "no such file or folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, capsys, case, message) -> None:
    slide, out = tmp_path / "slide.tif", tmp_path / "out"
    if case == "unreadable":
        slide = tmp_path / "slide.svs"
        slide.write_text("not a slide\n")
    elif case == "no_mpp":
        write_pyramid(slide, np.full((300, 300, 3), 128, np.uint8), mpp=None)
    elif case == "blank":
        write_pyramid(slide, np.full((600, 500, 3), 255, np.uint8), mpp=0.25)
    elif case == "unwritable":
        write_pyramid(slide, np.full((300, 300, 3), 128, np.uint8), mpp=0.25)
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    code = main(["predict-wsi", "--checkpoint", checkpoint, str(slide), "--out", str(out), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_overlay_outlines_each_nucleus_on_the_thumbnail(tmp_path, disc_slide) -> None:
    run_seam_slide(disc_slide, tmp_path)
    overlay = np.asarray(Image.open(tmp_path / "discs_overlay.png"))
    assert overlay.shape == (460, 470, 3)  # smaller than THUMB_SIDE: the thumbnail is the slide itself
    rows, cols = np.nonzero(np.all(overlay == cdcl.wsi.pipeline.NUCLEUS_COLOR, axis=2))
    centres = np.array([(x, y) for x, y, _ in disc_slide[1]])
    distance = np.hypot(cols[:, None] + 0.5 - centres[:, 0], rows[:, None] + 0.5 - centres[:, 1])  # pixel x disc
    assert np.all(np.abs(distance.min(axis=1) - RADIUS) < 1.5)  # every drawn pixel lies on some disc's outline
    assert np.all((np.abs(distance - RADIUS) < 1.5).sum(axis=0) > 40)  # every disc is outlined


def test_a_real_checkpoint_predicts_images_and_slides(tmp_path, mosaic) -> None:
    """End to end through the real checkpoint loader, with an untrained tiny network (inference plumbing only)."""
    from cdcl.checkpoint import save_checkpoint
    from cdcl.config import load_config
    from cdcl.instances.postprocess import PostprocessParams
    from cdcl.models import build_model

    from helpers.training import TINY_MODEL

    config = load_config(None, [*TINY_MODEL, "infer.window=128", "model.pretrained=false", "data.mpp=0.5"])
    checkpoint = str(tmp_path / "tiny.pt")
    save_checkpoint(
        checkpoint,
        {
            "config": config.to_dict(),
            "weights": {"student": build_model(config.model).state_dict()},
            "postprocess": PostprocessParams().to_dict(),
        },
    )
    image = tmp_path / "tile.png"
    Image.fromarray(mosaic[100:300, 100:330]).save(image)
    assert (
        main(["predict", "--checkpoint", checkpoint, str(image), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    )
    assert np.asarray(Image.open(tmp_path / "p" / "tile_labels.png")).shape == (200, 230)
    slide = write_pyramid(tmp_path / "slide.tif", mosaic[:512, :768], mpp=0.25)
    out = tmp_path / "w"
    assert (
        main(
            [
                "predict-wsi",
                "--checkpoint",
                checkpoint,
                str(slide),
                "--out",
                str(out),
                "--tile",
                "256",
                "--workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = json.loads((out / "slide_summary.json").read_text())
    assert summary["level"] == 1 and summary["working_mpp"] == 0.5  # the checkpoint's resolution picks level 1
    assert summary["tiles"]["tissue"] == 2
    check_geojson(out / "slide.geojson")


def test_post_processing_workers_yield_cpu_to_the_forward_pass():
    """The pool starts at lower priority (nice +5), so on a small CPU the forward pass keeps its cores."""
    with cdcl.wsi.pipeline._start_pool(1) as pool:
        assert pool.submit(os.nice, 0).result() == os.nice(0) + 5


def test_default_workers_inline_on_a_cpu_most_cores_with_a_gpu(tmp_path, disc_slide, monkeypatch):
    image, _ = disc_slide
    summary = predict_slide(stand_in_predictor(), ArrayReader(image, mpp=0.25), tmp_path, stem="d", tile=128, halo=32)
    assert summary["workers"] == 0  # a CPU predictor: post-processing between tiles, in this process
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    workers = cdcl.wsi.pipeline.default_workers(torch.device("cuda"))
    assert (workers, cdcl.wsi.pipeline.reader_count(workers)) == (12, 3)  # with the main process: all 16 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cdcl.wsi.pipeline.default_workers(torch.device("cuda")) == 1
    assert [cdcl.wsi.pipeline.reader_count(w) for w in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_stain_normalisation_of_a_slide_uses_one_estimate_of_its_stain(tmp_path, mosaic, monkeypatch) -> None:
    predictor = dataclasses.replace(stand_in_predictor(), stain=fit_reference("macenko", [mosaic], "labeled.txt"))
    sources = []
    original = StainNormalizer.__call__
    monkeypatch.setattr(
        StainNormalizer, "__call__", lambda self, image: sources.append(self.source) or original(self, image)
    )
    summary = predict_slide(predictor, ArrayReader(mosaic, mpp=0.25), tmp_path, stem="m", tile=256, halo=32)
    assert summary["stain_norm"] == "macenko" and len(sources) == summary["tiles"]["tissue"] > 1
    assert sources[0] is not None and all(source is sources[0] for source in sources)
    one_colour = ArrayReader(np.full((300, 300, 3), (150, 60, 170), np.uint8), mpp=0.25)  # tissue, no stain profile
    assert predict_slide(predictor, one_colour, tmp_path, stem="flat", tile=256, halo=32)["stain_norm"] is None
