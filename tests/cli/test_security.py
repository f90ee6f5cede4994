"""Untrusted files cannot run code, exhaust the machine or reach outside the dataset: checkpoints whose pickle
would run a command, XML with external entities or entity bombs, images declaring absurd sizes, split lists
naming paths. Every attack goes through the real CLI; each is recorded for docs/RELIABILITY.md."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cdcl.checkpoint import load_checkpoint

from helpers.cli_cases import CliResult, World, assert_ok, assert_refused, copy_data, run_cdcl, write_slide

FIRST = "synth_000"
# What refusing an attack may cost beyond the same command on genuine input: CPU time (not wall time) and peak
# memory. Expanding an entity bomb takes minutes and gigabytes; decoding a 10^10-pixel image bomb, 30 GB.
EXTRA_CPU_SECONDS = 3.0
EXTRA_MEMORY_MB = 100.0


# ---- checkpoints whose pickle runs a command -------------------------------------------------------------------


class RunsCommand:
    """Pickles as a call of ``os.system(command)``: unpickling it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def malicious_checkpoint(world: World, path: Path, marker: Path, zip_format: bool = True) -> Path:
    """A real cdcl checkpoint (format tag, config, weights) with one metadata value replaced by the payload."""
    payload = load_checkpoint(world.checkpoint)
    payload["cdcl_version"] = RunsCommand(f"touch {marker}")
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    return path


def test_the_malicious_checkpoint_really_runs_its_command_when_unpickled(world, tmp_path):
    """The control: loading it the unsafe way (``weights_only=False``) does create the marker."""
    marker = tmp_path / "marker"
    path = malicious_checkpoint(world, tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


REFUSED = "refusing to load checkpoint: it holds objects other than tensors and plain data (it could run code"


@pytest.mark.parametrize(
    "command", ["predict", "predict-wsi", "evaluate", "train-resume", "train-pretrained", "predict-legacy-pickle"]
)
def test_a_checkpoint_that_would_run_a_command_is_refused(world, tmp_path, record, command):
    marker = tmp_path / "marker"
    evil = malicious_checkpoint(world, tmp_path / "evil.pt", marker, zip_format=command != "predict-legacy-pickle")
    out = tmp_path / "out"
    image = world.data / "images" / f"{FIRST}.png"
    mentions: tuple[str, ...] = ("evil.pt", REFUSED)
    if command in ("predict", "predict-legacy-pickle"):
        args = ["predict", "--checkpoint", evil, image, "--out", out, "--device", "cpu"]
        if command == "predict-legacy-pickle":  # torch's pre-1.6 format: refused before any unpickling
            mentions = ("evil.pt", "not a readable checkpoint: corrupt, truncated or another format")
    elif command == "predict-wsi":
        args = [
            "predict-wsi",
            "--checkpoint",
            evil,
            write_slide(tmp_path / "slide.tif"),
            "--out",
            out,
            "--workers",
            "0",
        ]
    elif command == "evaluate":
        args = [
            "evaluate",
            "--checkpoint",
            evil,
            "--data",
            world.data,
            "--format",
            "folder",
            "--out",
            out,
            "--device",
            "cpu",
        ]
    elif command == "train-resume":
        out.mkdir()
        shutil.move(evil, out / "last.pt")
        args, mentions = world.train_args(out), ("last.pt", REFUSED)
    else:  # a "pretrained encoder" file from the internet
        args = world.train_args(out, f"model.pretrained={evil}")
        mentions = ("evil.pt", "config key 'model.pretrained': cannot load")
    result = run_cdcl(*args)
    given = {
        "predict-legacy-pickle": "checkpoint in torch's legacy (non-zip) pickle format that runs `touch` when loaded",
        "train-resume": "last.pt in the run folder whose pickle runs `touch` when loaded",
        "train-pretrained": "model.pretrained = a weights file whose pickle runs `touch` when loaded",
    }.get(command, "checkpoint whose pickle runs `touch` when loaded")
    record(
        command.removesuffix("-legacy-pickle").replace("train-resume", "train").replace("train-pretrained", "train"),
        given,
        result,
        "exit 2, command not run",
        outcome="refused; the command did not run" if not marker.exists() else "THE COMMAND RAN",
    )
    assert_refused(result, *mentions)
    assert not marker.exists(), "the checkpoint's command ran"


# ---- XML attacks -------------------------------------------------------------------------------------------------

REGION = (
    '<Region Id="1"{attr}><Vertices><Vertex X="10" Y="10"/><Vertex X="30" Y="10"/><Vertex X="30" Y="30"/></Vertices>'
    "</Region>"
)
LAUGHS = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
XML_ATTACKS = {
    "xxe-local-file": (
        "XML whose external entity reads a local file (XXE)",
        '<!DOCTYPE Annotations [<!ENTITY secret SYSTEM "file://{secret}">]>',
        ' Text="&secret;"',
    ),
    "billion-laughs": (
        "XML 'billion laughs' entity bomb (10^9 expansions)",
        f'<!DOCTYPE Annotations [<!ENTITY lol0 "lol">{LAUGHS}]>',
        ' Text="&lol9;"',
    ),
    "external-dtd": (
        "XML loading an external DTD over the network",
        '<!DOCTYPE Annotations SYSTEM "http://127.0.0.1:9/evil.dtd">',
        "",
    ),
}
SECRET = "TOP-SECRET-7f3a"


def xml_dataset(world: World, data: Path, doctype: str = "", attr: str = "") -> Path:
    """A monuseg-layout copy of the tiny dataset whose first item is annotated by an Aperio XML file."""
    copy_data(world, data)
    (data / "masks" / f"{FIRST}.png").unlink()
    (data / "annotations").mkdir()
    body = f"<Annotations><Annotation><Regions>{REGION.format(attr=attr)}</Regions></Annotation></Annotations>"
    (data / "annotations" / f"{FIRST}.xml").write_text(f'<?xml version="1.0"?>\n{doctype}{body}')
    return data


@pytest.fixture(scope="module")
def genuine(world, tmp_path_factory) -> Callable[[str], CliResult]:
    """Each command of the resource tests, run once on genuine input: the yardstick of what a refusal may cost."""
    root = tmp_path_factory.mktemp("genuine")
    monuseg = xml_dataset(world, root / "monuseg")
    image = world.data / "images" / f"{FIRST}.png"
    commands = {
        "data check monuseg": ["data", "check", monuseg, "--format", "monuseg"],
        "evaluate monuseg": [
            "evaluate",
            "--checkpoint",
            world.checkpoint,
            "--data",
            monuseg,
            "--format",
            "monuseg",
            "--out",
            root / "evaluate",
            "--device",
            "cpu",
        ],
        "data check folder": ["data", "check", world.data, "--format", "folder"],
        "predict": ["predict", "--checkpoint", world.checkpoint, image, "--out", root / "predict", "--device", "cpu"],
    }
    results: dict[str, CliResult] = {}

    def run(key: str) -> CliResult:
        if key not in results:
            results[key] = run_cdcl(*commands[key])
            assert_ok(results[key])
        return results[key]

    return run


def cost(result: CliResult, yardstick: CliResult) -> str:
    return (
        f"refused: {result.cpu_seconds:.2f} CPU s, peak {result.max_rss_mb:.0f} MB (genuine input: "
        f"{yardstick.cpu_seconds:.2f} s, {yardstick.max_rss_mb:.0f} MB)"
    )


def assert_cheap(result: CliResult, yardstick: CliResult) -> None:
    assert result.cpu_seconds < yardstick.cpu_seconds + EXTRA_CPU_SECONDS, cost(result, yardstick)
    assert result.max_rss_mb < yardstick.max_rss_mb + EXTRA_MEMORY_MB, cost(result, yardstick)


@pytest.mark.parametrize("attack", list(XML_ATTACKS))
@pytest.mark.parametrize("command", ["data check", "evaluate"])
def test_xml_attacks_are_refused_quickly_with_bounded_memory(world, genuine, tmp_path, record, attack, command):
    given, doctype, attr = XML_ATTACKS[attack]
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    data = xml_dataset(world, tmp_path / "data", doctype.format(secret=secret), attr)
    out = tmp_path / "out"
    if command == "data check":
        result = run_cdcl("data", "check", data, "--format", "monuseg", "--json", out / "report.json")
        message = next((line.strip() for line in result.stdout.splitlines() if f"{FIRST}.xml" in line), result.stdout)
    else:
        result = run_cdcl(
            "evaluate",
            "--checkpoint",
            world.checkpoint,
            "--data",
            data,
            "--format",
            "monuseg",
            "--out",
            out,
            "--device",
            "cpu",
        )
        message = result.last_line
    yardstick = genuine(f"{command} monuseg")
    record(command, given, result, "exit 2", message=message, outcome=cost(result, yardstick))
    assert "Traceback" not in result.stderr and result.rc == 2
    assert f"{FIRST}.xml: refused XML with a DTD or entities (unsafe: " in message
    assert_cheap(result, yardstick)
    leaked = (
        [p for p in out.rglob("*") if p.is_file() and SECRET in p.read_text(errors="replace")] if out.exists() else []
    )
    assert SECRET not in result.stdout + result.stderr and not leaked


# ---- decompression bombs ------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def tiff_declaring(width: int, height: int) -> bytes:
    """A 150-byte deflate TIFF whose only page declares ``width x height`` grey pixels in one strip."""
    strip = zlib.compress(b"\0" * 64)
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(strip)),
    ]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    entries = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_offset if tag == 273 else value)
        if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in tags
    )
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0" + strip


BOMBS = {
    "png": ("100-byte PNG declaring 100000 x 100000 pixels", png_declaring, "decompression bomb"),
    "tiff": (
        "150-byte TIFF declaring 100000 x 100000 pixels",
        tiff_declaring,
        "image declares 100000 x 100000 = 10000000000 pixels, over the limit of 200000000",
    ),
}


@pytest.mark.parametrize("kind", list(BOMBS))
@pytest.mark.parametrize("command", ["predict", "data check"])
def test_decompression_bombs_are_refused_before_decoding(world, genuine, tmp_path, record, kind, command):
    given, make, mention = BOMBS[kind]
    out = tmp_path / "out"
    if command == "predict":
        bomb = tmp_path / f"bomb.{kind}"
        bomb.write_bytes(make(100_000, 100_000))
        result = run_cdcl("predict", "--checkpoint", world.checkpoint, bomb, "--out", out, "--device", "cpu")
        message = result.last_line
    else:
        data = copy_data(world, tmp_path / "data")
        (data / "images" / f"{FIRST}.png").unlink()
        bomb = data / "images" / f"{FIRST}.{kind}"
        bomb.write_bytes(make(100_000, 100_000))
        result = run_cdcl("data", "check", data, "--format", "folder")
        message = next((line.strip() for line in result.stdout.splitlines() if bomb.name in line), result.stdout)
    yardstick = genuine("predict" if command == "predict" else "data check folder")
    record(command, given, result, "exit 2", message=message, outcome=cost(result, yardstick))
    assert "Traceback" not in result.stderr and result.rc == 2
    assert bomb.name in message and mention in message
    assert_cheap(result, yardstick)
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("limit, expected", [("5000", 2), ("10000", 0), ("lots", 2)])
def test_the_pixel_limit_is_configurable(world, tmp_path, record, limit, expected):
    """CDCL_MAX_IMAGE_PIXELS moves the limit both ways: a genuine 96 x 96 image (9216 pixels) is refused under a
    limit of 5000 and read under 10000; a value that is not a positive integer is itself an error."""
    out = tmp_path / "out"
    image = world.data / "images" / f"{FIRST}.png"
    result = run_cdcl(
        "predict",
        "--checkpoint",
        world.checkpoint,
        image,
        "--out",
        out,
        "--device",
        "cpu",
        env={"CDCL_MAX_IMAGE_PIXELS": limit},
    )
    record("predict", f"genuine 96 x 96 image with CDCL_MAX_IMAGE_PIXELS={limit}", result, f"exit {expected}")
    if expected == 0:
        assert_ok(result)
        assert (out / f"{FIRST}_labels.png").exists()
    elif limit == "lots":
        assert_refused(result, "CDCL_MAX_IMAGE_PIXELS must be a positive integer, got 'lots'", out=out)
    else:
        assert_refused(
            result, f"{FIRST}.png", "96 x 96 = 9216 pixels, over the limit of 5000", "CDCL_MAX_IMAGE_PIXELS", out=out
        )


# ---- split lists and config paths ------------------------------------------------------------------------------

ESCAPES = {
    "parent-path": "../../etc/passwd",
    "absolute-path": "/etc/passwd",
    "tile-of-a-path": "../secret[0:10,0:10]",
    "path-inside-dataset": "images/../../secret",
}


@pytest.mark.parametrize("name", list(ESCAPES))
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_split_lists_cannot_name_files_outside_the_dataset(world, tmp_path, record, command, name):
    line = ESCAPES[name]
    (tmp_path / "secret.png").write_bytes((world.data / "images" / f"{FIRST}.png").read_bytes())  # a real image outside
    split = tmp_path / "split"
    shutil.copytree(world.split, split)
    (split / "labeled.txt").write_text(f"{FIRST}\n{line}\n")
    out = tmp_path / "out"
    if command == "train":
        result = run_cdcl(*world.train_args(out, split=split))
    else:
        result = run_cdcl(
            "evaluate",
            "--checkpoint",
            world.checkpoint,
            "--data",
            world.data,
            "--format",
            "folder",
            "--split",
            split / "labeled.txt",
            "--out",
            out,
            "--device",
            "cpu",
        )
    record(command, f"split list naming {line!r}", result, "exit 2")
    assert_refused(result, "labeled.txt", f"line 2: unknown item '{line}'", out=out)


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.root", "datasets/missing"),
        ("data.split_dir", "splits/missing"),
        ("model.pretrained", "weights/missing.pth"),
    ],
)
def test_relative_config_paths_are_resolved_and_checked(world, tmp_path, record, key, value):
    """Relative paths are taken from the current folder; a missing one is named, resolved, with its key."""
    out = tmp_path / "out"
    result = run_cdcl(*world.train_args(out, f"{key}={value}"), cwd=tmp_path)
    record("train", f"{key}={value} (relative, missing)", result, "exit 2")
    assert_refused(result, f"{tmp_path / value}:", f"config key '{key}'", "not found", out=out)
