"""Broken inputs through the real CLI: every case exits 2 with one line naming the file (or config key) and the
problem, never a traceback, and leaves no partial output; valid but unusual inputs (RGBA, grey, 16-bit, palette
images and masks) work. Each case is recorded for docs/RELIABILITY.md (see tests/helpers/cli_cases.py)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cdcl.checkpoint import load_checkpoint, save_checkpoint
from cdcl.config import config_from_dict
from cdcl.models import build_model
from cdcl.testing.slides import write_pyramid

from helpers.cli_cases import (
    TINY_ENCODER,
    World,
    assert_ok,
    assert_refused,
    copy_data,
    run_cdcl,
    stray_files,
    write_slide,
)
from helpers.geojson import check_geojson

FIRST = "synth_000"  # a labeled training item of the tiny split


# ---- breaking things -----------------------------------------------------------------------------------------


def image_of(data: Path, stem: str = FIRST) -> Path:
    return data / "images" / f"{stem}.png"


def mask_of(data: Path, stem: str = FIRST) -> Path:
    return data / "masks" / f"{stem}.png"


def truncate(path: Path, keep: float = 0.4) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def replace_mask(data: Path, array: np.ndarray) -> Path:
    """Swap the first mask for a TIFF holding ``array`` (any dtype)."""
    mask_of(data).unlink()
    path = data / "masks" / f"{FIRST}.tif"
    tifffile.imwrite(path, array)
    return path


def all_image_modes(data: Path) -> str:
    """Re-save items 0-5 as RGBA, grey, 16-bit grey, 16-bit RGB TIFF, palette and grey+alpha images, and three
    masks as palette, 16-bit and equal-channel RGB images: every one must be read as the same pixels."""
    images = [image_of(data, f"synth_{i:03d}") for i in range(6)]
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    Image.fromarray(rgb[0]).convert("RGBA").save(images[0])
    Image.fromarray(rgb[1]).convert("L").save(images[1])
    Image.fromarray(np.asarray(Image.fromarray(rgb[2]).convert("L")).astype(np.uint16) * 257).save(images[2])
    images[3].unlink()
    tifffile.imwrite(images[3].with_suffix(".tif"), rgb[3].astype(np.uint16) * 257, photometric="rgb")
    Image.fromarray(rgb[4]).convert("P", palette=Image.Palette.ADAPTIVE).save(images[4])
    Image.fromarray(rgb[5]).convert("LA").save(images[5])
    masks = [mask_of(data, f"synth_{i:03d}") for i in range(3)]
    labels = [np.asarray(Image.open(p)) for p in masks]
    Image.fromarray(labels[0].astype(np.uint8), mode="L").convert("P").save(masks[0])
    Image.fromarray(labels[1].astype(np.uint16)).save(masks[1])
    Image.fromarray(np.repeat(labels[2].astype(np.uint8)[:, :, None], 3, axis=2)).save(masks[2])
    return "RGBA, grey, 16-bit grey PNG, 16-bit RGB TIFF, palette and grey+alpha images; palette, 16-bit and RGB masks"


def to_monuseg(data: Path, xml_text: str | bytes) -> Path:
    """The first item's mask replaced by an Aperio XML file with ``xml_text``; returns the XML path."""
    mask_of(data).unlink()
    (data / "annotations").mkdir()
    path = data / "annotations" / f"{FIRST}.xml"
    path.write_bytes(xml_text if isinstance(xml_text, bytes) else xml_text.encode())
    return path


VALID_XML = (
    '<Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="10" Y="10"/><Vertex X="30" Y="10"/>'
    '<Vertex X="30" Y="30"/><Vertex X="10" Y="30"/></Vertices></Region></Regions></Annotation></Annotations>'
)


def colour_mask(data: Path) -> None:
    labels = np.zeros((96, 96, 3), np.uint8)
    labels[..., 1] = 1  # green only: the channels disagree
    Image.fromarray(labels).save(mask_of(data))


def duplicate_stem(data: Path) -> None:
    tifffile.imwrite(data / "images" / f"{FIRST}.tif", np.zeros((96, 96, 3), np.uint8))


def empty_folders(data: Path) -> None:
    for path in data.rglob("*.png"):
        path.unlink()


# Dataset breakages: description, how, and the strings the one-line message must contain. FIRST is labeled.
DATA_BREAKS: dict[str, tuple[str, Callable[[Path], object], tuple[str, ...]]] = {
    "truncated-image": (
        "PNG cut to 40% of its bytes",
        lambda d: truncate(image_of(d)),
        (f"{FIRST}.png", "not a readable image"),
    ),
    "zero-byte-image": ("0-byte PNG", lambda d: image_of(d).write_bytes(b""), (f"{FIRST}.png", "empty file (0 bytes)")),
    "text-as-png": (
        "text file named .png",
        lambda d: image_of(d).write_text("hello\n"),
        (f"{FIRST}.png", "not a readable image"),
    ),
    "mask-wrong-size": (
        "50x60 mask for a 96x96 image",
        lambda d: Image.fromarray(np.ones((50, 60), np.uint8)).save(mask_of(d)),
        (f"masks/{FIRST}.png", "mask is 50x60 but its image is 96x96"),
    ),
    "float-mask": (
        "float32 TIFF mask with value 0.5",
        lambda d: replace_mask(d, np.full((96, 96), 0.5, np.float32)),
        (f"{FIRST}.tif", "float mask with non-integral values"),
    ),
    "negative-mask": (
        "int16 TIFF mask with value -3",
        lambda d: replace_mask(d, np.full((96, 96), -3, np.int16)),
        (f"{FIRST}.tif", "negative values"),
    ),
    "colour-mask": ("RGB mask whose channels differ", colour_mask, (f"{FIRST}.png", "colour mask")),
    "duplicate-stems": (
        f"images/{FIRST}.png and images/{FIRST}.tif",
        duplicate_stem,
        (f"{FIRST}.tif", f"duplicate stem '{FIRST}'"),
    ),
    "orphan-mask": (
        "mask without an image",
        lambda d: shutil.copy(mask_of(d), d / "masks" / "ghost.png"),
        ("ghost.png", "no image with stem 'ghost'"),
    ),
    "empty-folder": ("images/ and masks/ empty", empty_folders, ("images", "no images in this folder")),
    "malformed-xml": (
        "Aperio XML cut mid-element",
        lambda d: to_monuseg(d, VALID_XML[:60]),
        (f"{FIRST}.xml", "malformed XML"),
    ),
    "empty-xml": ("0-byte Aperio XML", lambda d: to_monuseg(d, ""), (f"{FIRST}.xml", "empty XML file")),
    "not-aperio-xml": (
        "XML with another root element",
        lambda d: to_monuseg(d, "<svg/>"),
        (f"{FIRST}.xml", "not an Aperio ImageScope XML"),
    ),
}
XML_BREAKS = ("malformed-xml", "empty-xml", "not-aperio-xml")


def broken_data(world: World, tmp_path: Path, key: str) -> tuple[Path, str, str, tuple[str, ...]]:
    """(dataset folder, format, description, mentions) of a copy of the tiny dataset with one breakage."""
    given, breaker, mentions = DATA_BREAKS[key]
    data = copy_data(world, tmp_path / "data")
    breaker(data)
    return data, "monuseg" if key in XML_BREAKS else "folder", given, mentions


def unwritable(tmp_path: Path) -> Path:
    """An output path below a regular file: it cannot be created, even by root."""
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    return tmp_path / "file.txt" / "out"


# ---- broken checkpoints (built once) -----------------------------------------------------------------------------

CHECKPOINT_BREAKS = {
    "missing-checkpoint": ("checkpoint path that does not exist", "checkpoint not found"),
    "corrupt-checkpoint": (
        "4 KiB of random bytes named .pt",
        "not a readable checkpoint: corrupt, truncated or another format",
    ),
    "truncated-checkpoint": (
        "checkpoint cut to half its bytes",
        "not a readable checkpoint: corrupt, truncated or another format",
    ),
    "zero-byte-checkpoint": ("0-byte .pt file", "not a readable checkpoint: corrupt, truncated or another format"),
    "foreign-checkpoint": ("a plain torch.save'd state dict (no cdcl metadata)", "not a cdcl checkpoint"),
    "other-architecture": (
        "cdcl checkpoint whose weights are of another encoder",
        "checkpoint weights do not match its model",
    ),
    "bad-metadata": ("cdcl checkpoint whose stored config has an unknown key", "checkpoint metadata is invalid"),
}


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    good = world.checkpoint.read_bytes()
    paths = {key: folder / f"{key}.pt" for key in CHECKPOINT_BREAKS}
    paths["corrupt-checkpoint"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["truncated-checkpoint"].write_bytes(good[: len(good) // 2])
    paths["zero-byte-checkpoint"].write_bytes(b"")
    payload = load_checkpoint(world.checkpoint)
    torch.save({"state_dict": payload["weights"]["student"]}, paths["foreign-checkpoint"])
    config = config_from_dict(payload["config"])
    config.model.encoder = "lcnet_050"  # another family, as small
    other = build_model(config.model).state_dict()
    save_checkpoint(
        paths["other-architecture"],
        {**{k: v for k, v in payload.items() if k != "format"}, "weights": {"student": other, "teacher": other}},
    )
    bad = {k: v for k, v in payload.items() if k != "format"}
    bad["config"] = {**payload["config"], "colour": "blue"}
    save_checkpoint(paths["bad-metadata"], bad)
    return paths


# ---- data check --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k in DATA_BREAKS if k != "empty-folder"])
def test_data_check_lists_the_problem(world, tmp_path, record, key):
    data, fmt, given, mentions = broken_data(world, tmp_path, key)
    result = run_cdcl("data", "check", data, "--format", fmt)
    problems = [line.strip() for line in result.stdout.splitlines() if all(m in line for m in mentions)]
    record("data check", given, result, "exit 2", message=problems[0] if problems else result.stdout)
    assert "Traceback" not in result.stderr and result.rc == 2, result.stderr
    assert len(problems) == 1, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("1 problem found")


def test_data_check_refuses_an_empty_dataset(world, tmp_path, record):
    data, _, given, mentions = broken_data(world, tmp_path, "empty-folder")
    result = run_cdcl("data", "check", data, "--format", "folder")
    record("data check", given, result, "exit 2", message=result.stdout.strip().splitlines()[-2].strip())
    assert result.rc == 2 and "Traceback" not in result.stderr
    assert "images: no images in this folder" in result.stdout


@pytest.mark.parametrize("case", ["missing-root", "root-is-a-file", "no-images-folder"])
def test_data_check_refuses_what_is_not_a_dataset(tmp_path, record, case):
    root = {
        "missing-root": tmp_path / "nowhere",
        "root-is-a-file": tmp_path / "file.txt",
        "no-images-folder": tmp_path,
    }[case]
    (tmp_path / "file.txt").write_text("x")
    result = run_cdcl("data", "check", root, "--format", "folder")
    record(
        "data check",
        {
            "missing-root": "folder that does not exist",
            "root-is-a-file": "a file as the dataset folder",
            "no-images-folder": "folder without images/",
        }[case],
        result,
        "exit 2",
    )
    assert_refused(result, str(root))


def test_data_check_reads_every_image_mode(world, tmp_path, record):
    data = copy_data(world, tmp_path / "data")
    given = all_image_modes(data)
    result = run_cdcl("data", "check", data, "--format", "folder", "--json", tmp_path / "report.json")
    record("data check", given, result, "exit 0")
    assert_ok(result)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 10 and report["labeled"] == 10 and report["problems"] == []
    assert report["image_sizes"]["unique"] == {"96x96": 10}


def test_data_check_json_to_an_unwritable_folder(world, tmp_path, record):
    target = unwritable(tmp_path) / "report.json"
    result = run_cdcl("data", "check", world.data, "--format", "folder", "--json", target)
    record("data check", "--json below a regular file", result, "exit 2")
    assert_refused(result, "file.txt/out", "cannot create output folder")


# ---- split ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["zero-byte-image", "text-as-png", "duplicate-stems", "empty-folder"])
def test_split_refuses(world, tmp_path, record, key):
    data, fmt, given, mentions = broken_data(world, tmp_path, key)
    out = tmp_path / "split"
    result = run_cdcl("split", data, "--format", fmt, "--labeled", "1/4", "--tile", "48", "--out", out)
    record("split", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


@pytest.mark.parametrize("case", ["truncated-image", "image-modes"])
def test_split_reads_headers_only(world, tmp_path, record, case):
    """Splitting needs sizes, not pixels: a file with a good header splits (``data check`` and ``train`` catch
    the cut pixel data), and every image mode is accepted."""
    data = copy_data(world, tmp_path / "data")
    given = all_image_modes(data) if case == "image-modes" else DATA_BREAKS[case][0]
    if case == "truncated-image":
        truncate(image_of(data))
    out = tmp_path / "split"
    result = run_cdcl("split", data, "--format", "folder", "--labeled", "1/4", "--tile", "48", "--out", out)
    record(
        "split",
        given,
        result,
        "exit 0",
        outcome="accepted: split reads image headers only" if case == "truncated-image" else None,
    )
    assert_ok(result)
    lines = {name: (out / f"{name}.txt").read_text().split() for name in ("labeled", "unlabeled", "val", "test")}
    assert [len(lines[k]) for k in lines] == [8, 20, 1, 2]  # 1/4 of (7 training + 1 val image) x 4 tiles; 1 val, 2 test


SPLIT_ARGUMENTS = {
    # id: (description, arguments before --out, strings the message must name; None: --out below a file)
    "unwritable-out": ("--out below a regular file", ["--labeled", "1/4", "--format", "folder"], None),
    "bad-fraction": (
        "--labeled 3/2",
        ["--labeled", "3/2", "--format", "folder"],
        ("fraction '3/2' must be greater than 0 and at most 1",),
    ),
    "unknown-format": (
        "--format svs",
        ["--labeled", "1/4", "--format", "svs"],
        ("argument --format: invalid choice: 'svs'",),
    ),
    "negative-seed": (
        "--seed -1",
        ["--labeled", "1/4", "--format", "folder", "--seed", "-1"],
        ("--seed must be 0 or more",),
    ),
}


@pytest.mark.parametrize("case", list(SPLIT_ARGUMENTS))
def test_split_refuses_bad_arguments(world, tmp_path, record, case):
    given, args, mentions = SPLIT_ARGUMENTS[case]
    out = tmp_path / "split"
    if mentions is None:
        out, mentions = unwritable(tmp_path), ("file.txt/out", "cannot create output folder")
    result = run_cdcl("split", world.data, *args, "--out", out)
    record("split", given, result, "exit 2")
    if case == "unknown-format":  # argparse's usage error: exit 2, its last line names the option
        assert result.rc == 2 and "Traceback" not in result.stderr and mentions[0] in result.last_line
    else:
        assert_refused(result, *mentions, out=out)


# ---- train ---------------------------------------------------------------------------------------------------------


def assert_no_checkpoint(run: Path) -> None:
    """A refused training run leaves no checkpoint and no temporary file (the resolved config may be there)."""
    assert not list(run.glob("*.pt")) and not stray_files(run), sorted(p.name for p in run.iterdir())


@pytest.mark.parametrize(
    "key",
    [
        "truncated-image",
        "zero-byte-image",
        "text-as-png",
        "mask-wrong-size",
        "float-mask",
        "negative-mask",
        "duplicate-stems",
        "malformed-xml",
        "empty-xml",
    ],
)
def test_train_refuses_broken_data(world, tmp_path, record, key):
    data, fmt, given, mentions = broken_data(world, tmp_path, key)
    run = tmp_path / "run"
    result = run_cdcl(*world.train_args(run, f"data.format={fmt}", data=data))
    record("train", given, result, "exit 2")
    assert_refused(result, *mentions)
    assert_no_checkpoint(run)


def test_train_refuses_a_broken_image_read_by_a_worker_process(world, tmp_path, record):
    data, _, given, mentions = broken_data(world, tmp_path, "truncated-image")
    run = tmp_path / "run"
    result = run_cdcl(*world.train_args(run, "data.num_workers=1", data=data))
    record("train", given + ", read in a DataLoader worker", result, "exit 2")
    assert_refused(result, *mentions)
    assert_no_checkpoint(run)


def test_train_refuses_a_stain_reference_from_blank_tiles(world, tmp_path, record):
    data = copy_data(world, tmp_path / "data")
    for stem in (world.split / "labeled.txt").read_text().split():
        Image.fromarray(np.full((96, 96, 3), 255, np.uint8)).save(image_of(data, stem))
    run = tmp_path / "run"
    result = run_cdcl(*world.train_args(run, "data.stain_norm=macenko", data=data))
    record("train", "data.stain_norm=macenko with blank labeled images", result, "exit 2")
    assert_refused(result, "labeled.txt", "no stain reference", "too little tissue", out=run)


def split_with(tmp_path: Path, world: World, labeled: str) -> Path:
    split = tmp_path / "split"
    shutil.copytree(world.split, split)
    (split / "labeled.txt").write_text(labeled)
    return split


CONFIG_CASES = {
    # id: (description, --set overrides, YAML file text or None, strings the message must name)
    "unknown-key": (
        "--set train.iterashuns=3",
        ["train.iterashuns=3"],
        None,
        ("unknown config key 'train.iterashuns'",),
    ),
    "unknown-key-in-yaml": (
        "YAML with model.encodr",
        [],
        "model:\n  encodr: resnet18\n",
        ("bad.yaml", "unknown config key 'model.encodr'"),
    ),
    "wrong-type": (
        "--set data.batch_size=two",
        ["data.batch_size=two"],
        None,
        ("config key 'data.batch_size': expected int, got 'two'",),
    ),
    "wrong-type-in-yaml": (
        "YAML with optim.lr: fast",
        [],
        "optim:\n  lr: fast\n",
        ("bad.yaml", "config key 'optim.lr': expected float"),
    ),
    "section-not-mapping": (
        "YAML with optim: adam",
        [],
        "optim: adam\n",
        ("bad.yaml", "config key 'optim': expected a mapping"),
    ),
    "invalid-yaml": ("YAML that does not parse", [], "train: [1,\n", ("bad.yaml", "invalid YAML")),
    "bad-value": (
        "--set method.threshold=1.5",
        ["method.threshold=1.5"],
        None,
        ("method.threshold must be in [0, 1)",),
    ),
    "unknown-encoder": (
        "--set model.encoder=resnet19",
        ["model.encoder=resnet19"],
        None,
        ("unknown encoder 'resnet19'",),
    ),
    "missing-data-root": (
        "data.root that does not exist",
        ["data.root=/nonexistent/data"],
        None,
        ("data.root", "/nonexistent/data"),
    ),
    "empty-data-root": ("data.root left empty", ["data.root="], None, ("data.root", "not set")),
    "missing-split-dir": (
        "data.split_dir that does not exist",
        ["data.split_dir=/nonexistent/split"],
        None,
        ("data.split_dir", "/nonexistent/split"),
    ),
    "missing-pretrained": (
        "model.pretrained naming a missing file",
        ["model.pretrained=/nonexistent/w.pth"],
        None,
        ("model.pretrained", "/nonexistent/w.pth"),
    ),
    "pretrained-not-weights": (
        "model.pretrained naming a text file",
        ["model.pretrained=@TEXT"],
        None,
        ("model.pretrained", "notes.txt"),
    ),
    "unknown-stain-norm": (
        "--set data.stain_norm=vahadane",
        ["data.stain_norm=vahadane"],
        None,
        ("data.stain_norm 'vahadane' is not 'none', 'macenko' or 'reinhard'",),
    ),
    "unknown-stain-augment": (
        "--set augment.stain=strong",
        ["augment.stain=strong"],
        None,
        ("augment", "stain must be 'none' or 'hed'"),
    ),
    "pretrained-download-offline": (
        "model.pretrained=true with no network",
        ["model.pretrained=true"],
        None,
        ("model.pretrained", TINY_ENCODER, "Hugging Face hub"),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_train_refuses_bad_config(world, tmp_path, record, case):
    given, sets, yaml_text, mentions = CONFIG_CASES[case]
    config = world.config
    if yaml_text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(yaml_text)
    (tmp_path / "notes.txt").write_text("not weights\n")
    sets = [s.replace("@TEXT", str(tmp_path / "notes.txt")) for s in sets]
    run = tmp_path / "run"
    result = run_cdcl(*world.train_args(run, *sets, config=config))  # the hub is offline in tests (cli_cases)
    record("train", given, result, "exit 2")
    assert_refused(result, *mentions, out=run)


@pytest.mark.parametrize("case", ["missing-item", "unlabeled-item", "missing-config", "unwritable-out"])
def test_train_refuses_bad_lists_and_paths(world, tmp_path, record, case):
    data, split, run, config = world.data, world.split, tmp_path / "run", world.config
    if case == "missing-item":
        split = split_with(tmp_path, world, f"{FIRST}\nghost\n")
        given, mentions = (
            "labeled.txt naming an item not in the dataset",
            ("labeled.txt", "line 2: unknown item 'ghost'"),
        )
    elif case == "unlabeled-item":
        data = copy_data(world, tmp_path / "data")
        mask_of(data).unlink()
        given, mentions = "labeled.txt naming an item without a mask", ("labeled.txt", f"item '{FIRST}' has no mask")
    elif case == "missing-config":
        config, given, mentions = (
            tmp_path / "nope.yaml",
            "--config that does not exist",
            ("nope.yaml", "config file not found"),
        )
    else:
        run, given, mentions = (
            unwritable(tmp_path),
            "--out below a regular file",
            ("file.txt/out", "cannot create output folder"),
        )
    result = run_cdcl(*world.train_args(run, data=data, split=split, config=config))
    record("train", given, result, "exit 2")
    assert_refused(result, *mentions, out=run)


@pytest.mark.parametrize(
    "key",
    ["corrupt-checkpoint", "truncated-checkpoint", "zero-byte-checkpoint", "foreign-checkpoint", "other-architecture"],
)
def test_train_resume_refuses_a_bad_last_checkpoint(world, checkpoints, tmp_path, record, key):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoints[key], run / "last.pt")
    before = (run / "last.pt").read_bytes()
    result = run_cdcl(*world.train_args(run))
    record("train", f"resume from last.pt = {CHECKPOINT_BREAKS[key][0]}", result, "exit 2")
    mention = (
        "cannot resume: checkpoint does not match this run"
        if key == "other-architecture"
        else CHECKPOINT_BREAKS[key][1]
    )
    assert_refused(result, "last.pt", mention)
    assert (run / "last.pt").read_bytes() == before  # the user's file is left alone
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_train_resume_refuses_another_model_configuration(world, tmp_path, record):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world.checkpoint, run / "last.pt")
    result = run_cdcl(*world.train_args(run, "model.embed_dim=4"))
    record("train", "resume with a different model config than last.pt's", result, "exit 2")
    assert_refused(result, "last.pt", "different model configuration")


def test_train_accepts_every_image_mode(world, tmp_path, record):
    data = copy_data(world, tmp_path / "data")
    given = all_image_modes(data)
    run = tmp_path / "run"
    result = run_cdcl(*world.train_args(run, data=data))
    record("train", given, result, "exit 0")
    assert_ok(result)
    assert load_checkpoint(run / "best.pt")["step"] == 2 and not stray_files(run)


# ---- evaluate ------------------------------------------------------------------------------------------------------


def evaluate_args(checkpoint: Path, data: Path, out: Path, fmt: str = "folder", *extra: str) -> list[str]:
    return [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--format",
        fmt,
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize("key", list(CHECKPOINT_BREAKS))
def test_evaluate_refuses_bad_checkpoint(world, checkpoints, tmp_path, record, key):
    out = tmp_path / "out"
    result = run_cdcl(*evaluate_args(checkpoints[key], world.data, out))
    record("evaluate", CHECKPOINT_BREAKS[key][0], result, "exit 2")
    assert_refused(result, f"{key}.pt", CHECKPOINT_BREAKS[key][1], out=out)


@pytest.mark.parametrize(
    "key",
    [
        "truncated-image",
        "zero-byte-image",
        "mask-wrong-size",
        "float-mask",
        "negative-mask",
        "malformed-xml",
        "empty-xml",
        "not-aperio-xml",
    ],
)
def test_evaluate_refuses_broken_data(world, tmp_path, record, key):
    data, fmt, given, mentions = broken_data(world, tmp_path, key)
    out = tmp_path / "out"
    result = run_cdcl(*evaluate_args(world.checkpoint, data, out, fmt))
    record("evaluate", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


@pytest.mark.parametrize("case", ["missing-item", "unlabeled-item", "path-in-split", "unwritable-out"])
def test_evaluate_refuses_bad_lists_and_outputs(world, tmp_path, record, case):
    data, out, split = world.data, tmp_path / "out", tmp_path / "list.txt"
    split.write_text(f"{FIRST}\n")
    if case == "missing-item":
        split.write_text(f"{FIRST}\nghost\n")
        given, mentions = "--split naming an item not in the dataset", ("list.txt", "line 2: unknown item 'ghost'")
    elif case == "unlabeled-item":
        data = copy_data(world, tmp_path / "data")
        mask_of(data).unlink()
        given, mentions = "--split naming an item without a mask", (f"{FIRST}.png", f"item '{FIRST}' has no mask")
    elif case == "path-in-split":
        split.write_text(f"images/{FIRST}.png\n")
        given, mentions = (
            "--split naming a file path instead of an item",
            ("list.txt", f"unknown item 'images/{FIRST}.png'"),
        )
    else:
        out, given, mentions = (
            unwritable(tmp_path),
            "--out below a regular file",
            ("file.txt/out", "cannot create output folder"),
        )
    result = run_cdcl(*evaluate_args(world.checkpoint, data, out, "folder", "--split", str(split)))
    record("evaluate", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


def test_evaluate_accepts_every_image_mode(world, tmp_path, record):
    data = copy_data(world, tmp_path / "data")
    given = all_image_modes(data)
    out = tmp_path / "out"
    result = run_cdcl(*evaluate_args(world.checkpoint, data, out))
    record("evaluate", given, result, "exit 0")
    assert_ok(result)
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 11 and len(list((out / "overlays").glob("*.png"))) == 10 and not stray_files(out)


# ---- predict -------------------------------------------------------------------------------------------------------


def predict_args(checkpoint: Path, out: Path, *inputs: Path) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint), *map(str, inputs), "--out", str(out), "--device", "cpu"]


@pytest.mark.parametrize("key", ["truncated-image", "zero-byte-image", "text-as-png"])
def test_predict_refuses_a_broken_image(world, tmp_path, record, key):
    data, _, given, mentions = broken_data(world, tmp_path, key)
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(world.checkpoint, out, image_of(data)))
    record("predict", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


def test_predict_keeps_complete_outputs_of_earlier_images(world, tmp_path, record):
    """A folder with a good image before a broken one: the good one's files are complete, the broken one has none."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(image_of(world.data), folder / "a_good.png")
    (folder / "b_bad.png").write_bytes(image_of(world.data).read_bytes()[:500])
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(world.checkpoint, out, folder))
    record(
        "predict",
        "folder: a good image, then a truncated one",
        result,
        "exit 2",
        outcome="refused; the good image's outputs are kept, complete",
    )
    assert_refused(result, "b_bad.png", "not a readable image")
    assert sorted(p.name for p in out.iterdir()) == [
        "a_good.geojson",
        "a_good_labels.png",
        "a_good_nuclei.csv",
        "a_good_overlay.png",
    ]
    check_geojson(out / "a_good.geojson")


@pytest.mark.parametrize("case", ["empty-folder", "duplicate-stems", "missing-input", "unwritable-out", "bad-formats"])
def test_predict_refuses_bad_arguments(world, tmp_path, record, case):
    folder, out, extra = tmp_path / "in", tmp_path / "out", []
    folder.mkdir()
    shutil.copy(image_of(world.data), folder / "a.png")
    inputs = [folder]
    if case == "empty-folder":
        (folder / "a.png").unlink()
        given, mentions = "an empty input folder", ("in", "no images in folder")
    elif case == "duplicate-stems":
        Image.open(folder / "a.png").save(folder / "a.tif")
        given, mentions = "a.png and a.tif in one folder", ("a.tif", "two inputs share the name 'a'")
    elif case == "missing-input":
        inputs, given, mentions = (
            [tmp_path / "nope.png"],
            "an input that does not exist",
            ("nope.png", "no such file or folder"),
        )
    elif case == "unwritable-out":
        out, given, mentions = (
            unwritable(tmp_path),
            "--out below a regular file",
            ("file.txt/out", "cannot create output folder"),
        )
    else:
        extra, given, mentions = ["--formats", "labels,svg"], "--formats labels,svg", ("unknown --formats svg",)
    result = run_cdcl(*predict_args(world.checkpoint, out, *inputs), *extra)
    record("predict", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


@pytest.mark.parametrize("key", list(CHECKPOINT_BREAKS))
def test_predict_refuses_bad_checkpoint(world, checkpoints, tmp_path, record, key):
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(checkpoints[key], out, image_of(world.data)))
    record("predict", CHECKPOINT_BREAKS[key][0], result, "exit 2")
    assert_refused(result, f"{key}.pt", CHECKPOINT_BREAKS[key][1], out=out)


def test_predict_accepts_every_image_mode(world, tmp_path, record):
    data = copy_data(world, tmp_path / "data")
    given = all_image_modes(data)
    out = tmp_path / "out"
    result = run_cdcl(*predict_args(world.checkpoint, out, data / "images"))
    record("predict", given, result, "exit 0")
    assert_ok(result)
    for i in range(10):
        labels = np.asarray(Image.open(out / f"synth_{i:03d}_labels.png"))
        assert labels.shape == (96, 96)
        check_geojson(out / f"synth_{i:03d}.geojson")
    assert not stray_files(out)


# ---- predict-wsi ---------------------------------------------------------------------------------------------------


def wsi_args(checkpoint: Path, slide: Path, out: Path) -> list[str]:
    return [
        "predict-wsi",
        "--checkpoint",
        str(checkpoint),
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


SLIDE_CASES = {
    "text-as-slide": ("text file named .svs", ("slide.svs", "cannot read slide")),
    "zero-byte-slide": ("0-byte .tif", ("slide.tif", "cannot read slide")),
    "png-as-slide": ("a PNG tile renamed .svs", ("slide.svs", "cannot read slide")),
    "truncated-slide": ("pyramidal TIFF cut to 60% of its bytes", ("slide.tif", "of the slide: damaged file?")),
    "no-mpp": ("pyramidal TIFF without resolution, no --mpp", ("slide.tif", "pass --mpp")),
    "72-dpi-slide": (
        "pyramidal TIFF whose resolution tags say 72 dpi (352.8 um/px)",
        ("slide.tif", "implausible resolution"),
    ),
    "too-coarse-slide": ("pyramidal TIFF at 4 um/px for a model trained at 0.5", ("slide.tif", "more than 4x coarser")),
    "infinite-mpp": ("--mpp inf", ("--mpp must be between",)),
    "blank-slide": ("all-white pyramidal TIFF", ("slide.tif", "no tissue found")),
    "missing-slide": ("slide path that does not exist", ("slide.tif", "no such file or folder")),
    "damaged-tile": (
        "pyramidal TIFF with one level-0 tile's compressed bytes overwritten",
        ("slide.tif", "of the slide: damaged file?"),
    ),
}


@pytest.fixture(scope="module")
def half_micron_checkpoint(world, tmp_path_factory) -> Path:
    """The world's checkpoint, marked as trained at 0.5 microns per pixel (the slides' level 0)."""
    payload = load_checkpoint(world.checkpoint)
    payload["config"] = {**payload["config"], "data": {**payload["config"]["data"], "mpp": 0.5}}
    path = tmp_path_factory.mktemp("mpp") / "half_micron.pt"
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    return path


@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_predict_wsi_refuses_what_is_not_a_usable_slide(world, half_micron_checkpoint, tmp_path, record, case):
    given, mentions = SLIDE_CASES[case]
    slide = tmp_path / "slide.tif" if case == "infinite-mpp" else tmp_path / mentions[0]
    extra = ["--mpp", "inf"] if case == "infinite-mpp" else []
    if case == "text-as-slide":
        slide.write_text("not a slide\n")
    elif case == "zero-byte-slide":
        slide.write_bytes(b"")
    elif case == "png-as-slide":
        shutil.copy(image_of(world.data), slide)
    elif case == "truncated-slide":
        write_slide(slide)
        truncate(slide, 0.6)
    elif case == "no-mpp":
        write_slide(slide, mpp=None)
    elif case == "72-dpi-slide":
        write_slide(slide, mpp=25400 / 72)
    elif case == "too-coarse-slide":
        write_slide(slide, mpp=4.0)
    elif case == "infinite-mpp":
        write_slide(slide)
    elif case == "blank-slide":
        write_pyramid(slide, np.full((512, 512, 3), 255, np.uint8), mpp=0.5)
    elif case == "damaged-tile":
        damage_a_tile(write_slide(slide))
    out = tmp_path / "out"
    result = run_cdcl(*wsi_args(half_micron_checkpoint, slide, out), *extra)
    record("predict-wsi", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


def test_predict_wsi_refuses_a_folder_with_one_bad_slide_before_predicting_any(
    world, half_micron_checkpoint, tmp_path, record
):
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    write_slide(folder / "a.tif")
    (folder / "b.svs").write_text("not a slide\n")
    result = run_cdcl(*wsi_args(half_micron_checkpoint, folder, out))
    record(
        "predict-wsi",
        "a folder of two slides, the second a text file named .svs",
        result,
        "exit 2, the good slide not predicted",
    )
    assert_refused(result, "b.svs", "cannot read slide", out=out)


def test_predict_wsi_with_a_model_without_resolution_needs_none_from_the_slide(world, tmp_path):
    """A checkpoint that stores no microns per pixel (trained on a folder of tiles) predicts at level 0."""
    slide = write_slide(tmp_path / "slide.tif", mpp=None)
    result = run_cdcl(*wsi_args(world.checkpoint, slide, tmp_path / "out"))
    assert_ok(result)
    summary = json.loads((tmp_path / "out" / "slide_summary.json").read_text())
    assert summary["level"] == 0 and summary["slide_mpp"] is None and summary["nuclei"] > 0


def damage_a_tile(slide: Path) -> None:
    """Overwrite the compressed bytes of a level-0 tile in the middle of the tissue."""
    with tifffile.TiffFile(slide) as tif:
        page, middle = tif.pages[0], len(tif.pages[0].dataoffsets) // 2
        offset, count = page.dataoffsets[middle], page.databytecounts[middle]
    with open(slide, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(range(256)) * (count // 256) + bytes(count % 256))


@pytest.mark.parametrize(
    "key", ["corrupt-checkpoint", "truncated-checkpoint", "foreign-checkpoint", "other-architecture"]
)
def test_predict_wsi_refuses_bad_checkpoint(world, checkpoints, tmp_path, record, key):
    slide = write_slide(tmp_path / "slide.tif")
    out = tmp_path / "out"
    result = run_cdcl(*wsi_args(checkpoints[key], slide, out))
    record("predict-wsi", CHECKPOINT_BREAKS[key][0], result, "exit 2")
    assert_refused(result, f"{key}.pt", CHECKPOINT_BREAKS[key][1], out=out)


def test_predict_wsi_refuses_an_unwritable_output(world, tmp_path, record):
    slide = write_slide(tmp_path / "slide.tif")
    result = run_cdcl(*wsi_args(world.checkpoint, slide, unwritable(tmp_path)))
    record("predict-wsi", "--out below a regular file", result, "exit 2")
    assert_refused(result, "file.txt/out", "cannot create output folder")


SPREAD_CASES = {
    "shard-zero": (["--shard", "0/4"], "--shard 0/4 (shares count from 1)", ("--shard must be K/N", "'0/4'")),
    "shard-past-count": (["--shard", "5/4"], "--shard 5/4", ("--shard must be K/N", "'5/4'")),
    "shard-not-a-share": (["--shard", "x"], "--shard x", ("--shard must be K/N", "'x'")),
    "dask-local-zero": (["--dask", "local:0"], "--dask local:0 (no workers)", ("--dask must be", "'local:0'")),
    "silent-scheduler": (
        ["--dask", "tcp://127.0.0.1:9"],
        "--dask tcp://127.0.0.1:9, where no scheduler listens (Dask's connect timeout set to 3 s; at most 30 s)",
        ("no Dask scheduler answers at tcp://127.0.0.1:9 within 3 s",),
    ),
    "resources-without-dask": (["--resources", "GPU=1"], "--resources GPU=1 without --dask", ("pass --dask too",)),
}


@pytest.mark.parametrize("case", list(SPREAD_CASES))
def test_predict_wsi_refuses_bad_shards_and_clusters(world, tmp_path, record, case):
    extra, given, mentions = SPREAD_CASES[case]
    slide, out = write_slide(tmp_path / "slide.tif"), tmp_path / "out"
    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"}
    result = run_cdcl(*wsi_args(world.checkpoint, slide, out), *extra, env=env, timeout=60)
    record("predict-wsi", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)
    assert result.seconds < 30


def test_predict_wsi_dask_needs_the_cluster_extra(world, tmp_path, record, monkeypatch, capsys):
    """In-process: ``distributed`` made unimportable, as where the ``cluster`` extra is not installed."""
    from cdcl.cli import main

    slide, out = write_slide(tmp_path / "slide.tif"), tmp_path / "out"
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main([*wsi_args(world.checkpoint, slide, out), "--dask", "local:2"]) == 2
    err = capsys.readouterr().err.strip()
    record("predict-wsi", "--dask without the cluster extra installed", None, "exit 2", message=err)
    assert err.splitlines() == [
        "cdcl predict-wsi: error: --dask needs the optional 'distributed' package: pip install 'cdcl[cluster]'"
    ]
    assert not out.exists()


def test_predict_wsi_writes_complete_outputs(world, tmp_path, record):
    slide = write_slide(tmp_path / "slide.tif")
    out = tmp_path / "out"
    result = run_cdcl(*wsi_args(world.checkpoint, slide, out))
    record("predict-wsi", "512x768 pyramidal TIFF of synthetic tissue", result, "exit 0")
    assert_ok(result)
    assert sorted(p.name for p in out.iterdir()) == [
        "cohort.csv",
        "cohort_nuclei_per_mm2.png",
        "slide.geojson",
        "slide_nuclei.csv",
        "slide_overlay.png",
        "slide_summary.json",
    ]
    summary = json.loads((out / "slide_summary.json").read_text())
    assert len(check_geojson(out / "slide.geojson")["features"]) == summary["nuclei"]


# ---- tiles ---------------------------------------------------------------------------------------------------------

TILES_CASES = {
    "blank-slide": ("all-white pyramidal TIFF", [], ("slide.tif", "no tissue found")),
    "no-mpp": ("pyramidal TIFF without resolution, --tile-mpp 0.5", ["--tile-mpp", "0.5"], ("slide.tif", "pass --mpp")),
    "too-little-tissue": (
        "--size 512 --min-tissue 0.99 on a 512x768 slide with a 32 px margin",
        ["--size", "512", "--min-tissue", "0.99"],
        ("slide.tif", "no tile of 512 px is at least 99% tissue"),
    ),
    "tiny-size": ("--size 16", ["--size", "16"], ("--size must be at least 32 px",)),
    "text-as-slide": ("text file named .svs", [], ("slide.svs", "cannot read slide")),
    "missing-slide": ("slide path that does not exist", [], ("slide.tif", "no such file or folder")),
    "empty-folder": ("a folder without slides", [], ("empty", "no slides in folder")),
    "nan-tile-mpp": ("--tile-mpp nan", ["--tile-mpp", "nan"], ("--tile-mpp must be between 0.01 and 50",)),
    "zero-tile-mpp": ("--tile-mpp 0", ["--tile-mpp", "0"], ("--tile-mpp must be between 0.01 and 50",)),
    "negative-seed": ("--seed -1", ["--seed", "-1"], ("--seed 0 or more",)),
}


@pytest.mark.parametrize("case", list(TILES_CASES))
def test_tiles_refuses_what_is_not_a_usable_slide(tmp_path, record, case):
    given, extra, mentions = TILES_CASES[case]
    slide = tmp_path / {"text-as-slide": "slide.svs", "empty-folder": "empty"}.get(case, "slide.tif")
    if case == "blank-slide":
        write_pyramid(slide, np.full((512, 512, 3), 255, np.uint8), mpp=0.5)
    elif case == "no-mpp":
        write_slide(slide, mpp=None)
    elif case == "text-as-slide":
        slide.write_text("not a slide\n")
    elif case == "empty-folder":
        slide.mkdir()
    elif case != "missing-slide":
        write_slide(slide)
    out = tmp_path / "out"
    result = run_cdcl("tiles", slide, "--out", out, *extra)
    record("tiles", given, result, "exit 2")
    assert_refused(result, *mentions, out=out)


def test_tiles_refuses_an_unwritable_output_and_writes_a_good_slide(tmp_path, record):
    slide = write_slide(tmp_path / "slide.tif")
    result = run_cdcl("tiles", slide, "--out", unwritable(tmp_path))
    record("tiles", "--out below a regular file", result, "exit 2")
    assert_refused(result, "file.txt/out", "cannot create output folder")
    out = tmp_path / "tiles"
    result = run_cdcl("tiles", slide, "--out", out, "--size", "128", "--per-slide", "5")
    record("tiles", "512x768 pyramidal TIFF of synthetic tissue, 5 tiles of 128 px", result, "exit 0")
    assert_ok(result)
    assert len(list(out.glob("slide_x*_y*.png"))) == 5
