"""Cohorts: shares of a slide list for job arrays, slides as Dask tasks, and the cohort table."""

from __future__ import annotations

import csv
import fcntl
import json
from pathlib import Path

import distributed  # in the dev extra, so the Dask route is tested on every run
import numpy as np
import pytest

from cdcl.cli import main
from cdcl.errors import CdclError
from cdcl.testing.slides import (
    disc_image,
    monuseg_mosaic,
    stand_in_predictor,
    write_pyramid,
    write_untrained_checkpoint,
)
from cdcl.wsi.cohort import HISTOGRAM, INTERRUPTED, TABLE, record_failure, write_cohort
from cdcl.wsi.journal import lock_path
from cdcl.wsi.pipeline import OUTPUTS, predict_slide
from cdcl.wsi.readers import ArrayReader
from cdcl.wsi.shards import parse_shard, shard

PRODUCTS = [suffix for suffix in OUTPUTS if suffix != "_summary.json"]  # the summary holds times


@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("slides", [0, 1, 5, 12])
def test_shards_hold_every_slide_exactly_once(count, slides) -> None:
    paths = [Path(f"/data/{name}.svs") for name in np.random.default_rng(slides).permutation(slides).astype(str)]
    shares = [shard(paths, k, count) for k in range(1, count + 1)]
    assert sorted(p for share in shares for p in share) == sorted(paths)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard(list(reversed(paths)), 1, count) == shares[0]  # whatever order the slides were found in


@pytest.mark.parametrize("text", ["0/4", "5/4", "x", "1/0", "2", "-1/4", "1/4/2", ""])
def test_a_bad_shard_is_refused(text) -> None:
    with pytest.raises(CdclError, match="--shard must be K/N"):
        parse_shard(text)


def test_the_cohort_table_lists_finished_failed_running_and_missing_slides(tmp_path) -> None:
    image, _ = disc_image()
    summary = predict_slide(stand_in_predictor(), ArrayReader(image, mpp=0.25), tmp_path, stem="done", workers=0)
    record_failure(tmp_path, "bad", "bad.svs: no tissue found")
    (tmp_path / "killed.partial").mkdir()  # a journal nobody works on
    with open(lock_path(tmp_path, "busy"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a run predicting it holds it
        rows = write_cohort(tmp_path, ["done", "bad", "never", "busy"])
    assert [(r["slide"], r["status"]) for r in rows] == [
        ("bad", "failed"),
        ("busy", "running"),
        ("done", "finished"),
        ("killed", "failed"),
        ("never", "missing"),
    ]
    table = {row["slide"]: row for row in csv.DictReader(open(tmp_path / TABLE))}
    assert table["bad"]["error"] == "bad.svs: no tissue found" and table["killed"]["error"] == INTERRUPTED
    done = table["done"]
    area = 460 * 470 * 0.25**2 / 1e6  # the disc slide is white but for its discs: tissue is a share of it
    assert 0 < float(done["tissue_mm2"]) <= area and int(done["nuclei"]) == summary["nuclei"] == 9
    assert float(done["nuclei_per_mm2"]) == pytest.approx(9 / float(done["tissue_mm2"]), rel=1e-3)
    assert float(done["mean_nucleus_area_um2"]) == pytest.approx(summary["mean_nucleus_area_um2"])
    assert table["never"]["nuclei"] == "" and (tmp_path / HISTOGRAM).stat().st_size > 1000


def test_cdcl_cohort_names_the_slides_without_outputs(tmp_path, capsys) -> None:
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    out.mkdir()
    for stem in ("a", "b"):
        (slides / f"{stem}.svs").write_bytes(b"")
    record_failure(out, "a", "a.svs: no tissue found")
    assert main(["cohort", str(out), str(slides)]) == 0
    assert capsys.readouterr().out.splitlines() == ["a\tfailed\t", "b\tmissing\t"]
    assert main(["cohort", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


# ---- Dask ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny network at 0.5 um/px through the real checkpoint loader (Dask workers load it)."""
    from helpers.training import TINY_MODEL

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return write_untrained_checkpoint(path, [*TINY_MODEL, "infer.window=128", "data.mpp=0.5"])


@pytest.fixture(scope="module")
def slides(shared_data, tmp_path_factory) -> Path:
    """Three small pyramids of real H&E at the model's resolution, of 4, 2 and 1 tiles of 256 px."""
    mosaic = monuseg_mosaic(shared_data, 512, 512)
    folder = tmp_path_factory.mktemp("slides")
    for stem, (h, w) in {"s1": (512, 512), "s2": (256, 512), "s3": (256, 256)}.items():
        write_pyramid(folder / f"{stem}.tif", np.ascontiguousarray(mosaic[:h, :w]), mpp=0.5, min_side=128)
    return folder


def predict_args(checkpoint: Path, slides: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict-wsi",
        "--checkpoint",
        str(checkpoint),
        str(slides),
        "--out",
        str(out),
        "--tile",
        "256",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def plain(tiny_checkpoint, slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    assert main(predict_args(tiny_checkpoint, slides, out)) == 0
    return out


def assert_same_products(a: Path, b: Path, stems=("s1", "s2", "s3")) -> None:
    for stem in stems:
        for suffix in PRODUCTS:
            assert (a / f"{stem}{suffix}").read_bytes() == (b / f"{stem}{suffix}").read_bytes(), f"{stem}{suffix}"


def test_a_local_cluster_writes_the_files_of_a_plain_run(tiny_checkpoint, slides, plain, tmp_path) -> None:
    assert main(predict_args(tiny_checkpoint, slides, tmp_path, "--dask", "local:2")) == 0
    assert_same_products(plain, tmp_path)
    rows, plain_rows = (list(csv.DictReader(open(folder / TABLE))) for folder in (tmp_path, plain))
    assert [(r["slide"], r["status"], r["device"]) for r in rows] == [(f"s{i}", "finished", "cpu") for i in (1, 2, 3)]
    assert [{**r, "seconds": 0} for r in rows] == [{**r, "seconds": 0} for r in plain_rows]
    assert all(len(r["checkpoint_sha256"]) == 64 for r in rows)


def test_two_shards_write_the_files_of_a_plain_run(tiny_checkpoint, slides, plain, tmp_path) -> None:
    for k in (2, 1):
        assert main(predict_args(tiny_checkpoint, slides, tmp_path, "--shard", f"{k}/2")) == 0
        if k == 2:  # s2 alone: the others are missing so far
            rows = list(csv.DictReader(open(tmp_path / TABLE)))
            assert [r["status"] for r in rows] == ["missing", "finished", "missing"]
    assert_same_products(plain, tmp_path)


def test_a_slide_whose_worker_dies_is_finished_by_another_once(tiny_checkpoint, slides, plain, tmp_path) -> None:
    from cdcl.testing.cluster import DieMidSlide

    out, marker = tmp_path / "out", tmp_path / "died"
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(DieMidSlide("s1", marker))
        assert main(predict_args(tiny_checkpoint, slides, out, "--dask", cluster.scheduler_address)) == 0
    assert marker.exists()  # a worker died in the middle of s1
    summary = json.loads((out / "s1_summary.json").read_text())
    assert summary["tiles"]["resumed"] == 1 and summary["tiles"]["predicted_now"] == 3  # the next try resumed it
    assert_same_products(plain, out)  # each nucleus once
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.lock"))
