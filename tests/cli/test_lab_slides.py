"""Resolution and test-time augmentation through the real CLI, with a checkpoint from a real tiny training run:
``--mpp X|auto`` and ``--tta`` work in ``predict`` and ``evaluate``; what a checkpoint cannot serve is refused
in one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdcl.checkpoint import load_checkpoint, save_checkpoint

from helpers.cli_cases import assert_ok, assert_refused, run_cdcl

FIRST = "synth_000"


def variant(world, folder: Path, name: str, *, mpp: float | None = None, window: int | None = None, size=True) -> Path:
    """The world's checkpoint with its training resolution, window or nucleus size changed."""
    payload = {k: v for k, v in load_checkpoint(world.checkpoint).items() if k != "format"}
    config = payload["config"]
    if mpp is not None:
        payload["mpp"] = mpp
        config = {**config, "data": {**config["data"], "mpp": mpp}}
    if window is not None:
        config = {**config, "infer": {**config["infer"], "window": window}}
    if not size:
        payload.pop("nucleus_diameter")
    path = folder / f"{name}.pt"
    save_checkpoint(path, {**payload, "config": config})
    return path


@pytest.fixture(scope="module")
def quarter_micron(world, tmp_path_factory) -> Path:
    """The world's checkpoint, marked as trained at 0.25 microns per pixel."""
    return variant(world, tmp_path_factory.mktemp("lab"), "quarter_micron", mpp=0.25)


def predict_args(checkpoint: Path, image: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out), "--device", "cpu", *extra]


def test_training_stores_the_median_nucleus_diameter(world) -> None:
    diameter = load_checkpoint(world.checkpoint)["nucleus_diameter"]
    assert isinstance(diameter, float) and 5 < diameter < 40  # synthetic nuclei: radius 4-14 px


def test_evaluate_with_mpp_and_tta_scores_at_the_images_resolution(world, quarter_micron, tmp_path, record) -> None:
    out = tmp_path / "out"
    args = ["evaluate", "--checkpoint", str(quarter_micron), "--data", str(world.data), "--format", "folder"]
    result = run_cdcl(*args, "--out", str(out), "--device", "cpu", "--mpp", "0.3", "--tta", "dihedral")
    record("evaluate", "--mpp 0.3 --tta dihedral on a 0.25 um/px model", result, "exit 0")
    assert_ok(result)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 10 and 0 <= metrics["mean"]["dice"] <= 1


def test_predict_with_mpp_auto(world, tmp_path, record) -> None:
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(world.checkpoint, world.data / "images" / f"{FIRST}.png", out, "--mpp", "auto"))
    record("predict", "--mpp auto on a checkpoint with a stored nucleus size", result, "exit 0")
    assert_ok(result)
    assert (out / f"{FIRST}_labels.png").is_file()


CASES = {
    "window-does-not-fit": ("--tta dihedral on a checkpoint whose infer.window is 100", ("--tta", "dihedral")),
    "unknown-tta": ("--tta mirror", ("--tta", "mirror")),
    "mpp-without-model-mpp": ("--mpp 0.5 on a checkpoint without data.mpp", ("--mpp", "0.5")),
    "auto-without-size": ("--mpp auto on a checkpoint without a nucleus size", ("--mpp", "auto")),
    "mpp-negative": ("--mpp -0.25", ("--mpp", "-0.25")),
    "mpp-not-a-number": ("--mpp fast", ("--mpp", "fast")),
}
MENTIONS = {
    "window-does-not-fit": ("window-does-not-fit.pt", "infer.window 100", "does not fit the model"),
    "unknown-tta": ("--tta", "invalid choice: 'mirror'"),
    "mpp-without-model-mpp": ("--mpp needs the model's training resolution",),
    "auto-without-size": ("auto-without-size.pt", "--mpp auto needs the training nucleus size"),
    "mpp-negative": ("--mpp must be between 0.01 and 50.0", "-0.25"),
    "mpp-not-a-number": ("--mpp", "'fast'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_checkpoint_cannot_serve_is_refused(world, tmp_path, record, case) -> None:
    checkpoint = world.checkpoint
    if case == "window-does-not-fit":
        checkpoint = variant(world, tmp_path, case, window=100)
    elif case == "auto-without-size":
        checkpoint = variant(world, tmp_path, case, size=False)
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(checkpoint, world.data / "images" / f"{FIRST}.png", out, *CASES[case][1]))
    record("predict", CASES[case][0], result, "exit 2")
    if case in ("unknown-tta", "mpp-not-a-number"):  # argparse's usage error: exit 2, its own last line
        assert result.rc == 2 and "Traceback" not in result.stderr and not out.exists()
        assert all(text in result.last_line for text in MENTIONS[case]), result.last_line
        return
    assert_refused(result, *MENTIONS[case], out=out)


def test_a_config_with_an_unknown_tta_is_refused(world, tmp_path, record) -> None:
    result = run_cdcl(*world.train_args(tmp_path / "run", "infer.tta=mirror"))
    record("train", "infer.tta=mirror", result, "exit 2")
    assert_refused(result, "infer.tta must be 'none', 'flips' or 'dihedral'")
