"""The ``cdcl`` command: one entry point, one small builder per subcommand, shared option definitions.

Each subcommand's work lives in its module under ``cdcl.commands`` (imported only when it runs, so ``cdcl --help``
is instant). Range checks are argparse ``type=`` functions that raise a ``CdclError``; every ``CdclError``, from an
option or from the work, becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from cdcl import __version__
from cdcl.errors import CdclError
from cdcl.ranges import check_mpp
from cdcl.vocab import FORMATS, TTA_MODES
from cdcl.wsi.cluster import parse_dask, parse_resources
from cdcl.wsi.shards import parse_shard

N = TypeVar("N", int, float)

TILES_LIMITS = "--size must be at least 32 px, --per-slide at least 1, --min-tissue within [0, 1] and --seed 0 or more"
WSI_LIMITS = "--halo and --workers must be >= 0 and --batch-size >= 1"
BATCH_SIZE_LIMIT = "--batch-size must be at least 1, got {value}"


def checked(convert: Callable[[str], N], ok: Callable[[N], bool], message: str) -> Callable[[str], N]:
    """An argparse ``type=``: ``convert`` the text (a text it cannot convert is argparse's usage error, as for
    a plain ``type=int``), then a CdclError with ``message`` (``{value}`` filled in) unless ``ok(value)``."""

    def parse(text: str) -> N:
        value = convert(text)
        if not ok(value):
            raise CdclError(message.format(value=value))
        return value

    parse.__name__ = convert.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def mpp_option(option: str) -> Callable[[str], float]:
    """``type=`` of a microns-per-pixel option: a float in the plausible range (``cdcl.ranges``)."""

    def parse(text: str) -> float:
        return check_mpp(float(text), option)

    parse.__name__ = "float"
    return parse


def image_mpp(text: str) -> float | str:
    """``type=`` of the ``--mpp`` of images: ``auto`` or a plausible microns per pixel."""
    return text if text == "auto" else check_mpp(float(text), "--mpp")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    """Resolution and test-time augmentation: the options of every command that predicts images."""
    p.add_argument(
        "--mpp",
        type=image_mpp,
        default=None,
        metavar="UM|auto",
        help="microns per pixel of the images: they are rescaled to the model's resolution, predicted, and the "
        "nuclei scaled back; 'auto' estimates it per image from the predicted nucleus size (2-4 passes). "
        "Default: predict at the images' own pixels",
    )
    _add_tta(p)


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tta",
        choices=TTA_MODES,
        default=None,
        help="test-time augmentation: average each window's maps over 'flips' (4 passes) or 'dihedral' flips "
        "and 90-degree rotations (8 passes); default: the checkpoint's infer.tta ('none')",
    )


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a best.pt or last.pt written by `cdcl train`")


def _add_out(p: argparse.ArgumentParser, help: str = "output folder (created if missing)") -> None:
    p.add_argument("--out", required=True, metavar="DIR", help=help)


def _add_format(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--format", required=required, choices=FORMATS, help="dataset layout (see README, 'Data formats')")


def _add_device(p: argparse.ArgumentParser, batch_size_limit: str = BATCH_SIZE_LIMIT) -> None:
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument(
        "--batch-size",
        type=checked(int, lambda n: n >= 1, batch_size_limit),
        default=None,
        help="windows per forward pass (default: the checkpoint's, at least 16 on CUDA)",
    )


def _add_slide_mpp(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mpp",
        type=mpp_option("--mpp"),
        default=None,
        help="microns per pixel of level 0, for slides that lack it (overrides every slide's value)",
    )


Subparsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_demo(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="synthetic data -> supervised and CDCL models -> evaluation table and pictures")
    p.add_argument("--out", default="cdcl-demo", metavar="DIR", help="output folder (default: ./cdcl-demo)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per model (default: 100)")
    p.set_defaults(handler="cdcl.commands.demo:run")


def add_data(sub: Subparsers) -> None:
    p = sub.add_parser("data", help="inspect a dataset: `data check`, `data show`")
    p.set_defaults(show_help=p.print_help)
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    q = actions.add_parser("check", help="counts, sizes, nuclei per image, and every problem found")
    q.add_argument("data", metavar="DATA", help="dataset folder")
    _add_format(q)
    q.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    q.set_defaults(handler="cdcl.commands.data:check")
    q = actions.add_parser("show", help="write a PNG grid of augmented views (labeled, weak/strong pairs)")
    q.add_argument("data", metavar="DATA", help="dataset folder")
    _add_format(q)
    q.add_argument("--config", metavar="FILE", help="take augmentation settings from a training config")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    q.add_argument(
        "--n",
        type=checked(int, lambda n: n >= 1, "--n must be >= 1, got {value}"),
        default=6,
        help="number of images (rows)",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, metavar="PNG", help="output PNG file")
    q.set_defaults(handler="cdcl.commands.data:show")


def add_tiles(sub: Subparsers) -> None:
    p = sub.add_parser("tiles", help="cut tissue tiles from whole-slide images: unlabeled training data")
    p.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide files (SVS, TIFF, NDPI, MRXS, ...) or folders of them"
    )
    _add_out(p, help="folder for the PNG tiles, e.g. DATA/images of a `folder` dataset (created if missing)")
    p.add_argument(
        "--size",
        type=checked(int, lambda n: n >= 32, TILES_LIMITS),
        default=256,
        metavar="PX",
        help="tile side in pixels (default: 256)",
    )
    p.add_argument(
        "--per-slide",
        type=checked(int, lambda n: n >= 1, TILES_LIMITS),
        default=100,
        metavar="N",
        help="tiles drawn from each slide (default: 100)",
    )
    p.add_argument(
        "--tile-mpp",
        type=mpp_option("--tile-mpp"),
        default=None,
        metavar="UM",
        help="microns per pixel of the tiles: that of your annotated tiles (default: each slide's level 0)",
    )
    _add_slide_mpp(p)
    p.add_argument(
        "--min-tissue",
        type=checked(float, lambda x: 0 <= x <= 1, TILES_LIMITS),
        default=0.5,
        metavar="FRACTION",
        help="least share of a tile in the tissue mask (default: 0.5)",
    )
    p.add_argument(
        "--seed",
        type=checked(int, lambda n: n >= 0, TILES_LIMITS),
        default=0,
        help="which tiles are drawn (default: 0); tiles already written are kept",
    )
    p.set_defaults(handler="cdcl.commands.tiles:run")


def add_split(sub: Subparsers) -> None:
    p = sub.add_parser("split", help="write labeled/unlabeled/val/test lists for a label budget")
    p.add_argument("data", metavar="DATA", help="dataset folder")
    _add_format(p)
    p.add_argument(
        "--labeled", required=True, metavar="FRACTION", help="labeled fraction of the training items: 0.0625, 1/16, ..."
    )
    p.add_argument(
        "--seed",
        type=checked(int, lambda n: n >= 0, "--seed must be 0 or more, got {value}"),
        default=0,
        help="split seed (same inputs + seed = byte-identical files)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="PX",
        help="cut training images into PX x PX tiles (monuseg default: 250; 0: whole images)",
    )
    p.add_argument(
        "--val",
        type=float,
        default=None,
        metavar="FRACTION",
        help="validation share of the annotated training images (default: 0.1)",
    )
    p.add_argument(
        "--test",
        type=float,
        default=None,
        metavar="FRACTION",
        help="test share of the annotated images when the dataset has no official test set (default: 0.2)",
    )
    _add_out(p)
    p.set_defaults(handler="cdcl.commands.data:split")


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train a model; re-running the same command resumes")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config (see configs/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. method.w_contr=0"
    )
    _add_out(p, "run folder: resolved config, last.pt, best.pt, metrics.jsonl, curves.png")
    p.set_defaults(handler="cdcl.commands.train:run")


def add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on whole labeled images")
    _add_checkpoint(p)
    p.add_argument("--data", required=True, metavar="DATA", help="dataset folder")
    _add_format(p)
    p.add_argument("--split", metavar="FILE", help="list of items to evaluate (default: all labeled items)")
    _add_out(p)
    p.add_argument("--no-overlays", action="store_true", help="skip overlay PNGs")
    _add_image_options(p)
    _add_device(p)
    p.set_defaults(handler="cdcl.commands.evaluate:run")


def add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="the prediction-only model file (weights, config, thresholds) from a checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="a best.pt or last.pt written by `cdcl train`")
    p.add_argument("out", metavar="OUT", help="the model file to write")
    p.add_argument(
        "--half", action="store_true", help="store the weights as float16 (half the size; loaded back as float32)"
    )
    p.set_defaults(handler="cdcl.commands.export:run")


def add_predict(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="nuclei of images and folders: label map, GeoJSON, CSV, overlay")
    _add_checkpoint(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    _add_out(p)
    p.add_argument(
        "--formats",
        default="labels,geojson,csv,overlay",
        help="comma-separated subset of labels,labels-tiff,geojson,csv,overlay",
    )
    _add_image_options(p)
    _add_device(p)
    p.set_defaults(handler="cdcl.commands.predict:run")


def add_predict_wsi(sub: Subparsers) -> None:
    p = sub.add_parser("predict-wsi", help="nuclei of whole-slide images, streamed with bounded memory")
    _add_checkpoint(p)
    p.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE",
        help="slide files (SVS, TIFF, NDPI, MRXS, ...) or folders of them; re-running the same command "
        "skips the finished slides and resumes the interrupted one",
    )
    _add_out(p)
    _add_slide_mpp(p)
    p.add_argument(
        "--tile",
        type=checked(int, lambda n: n >= 64, "--tile must be at least 64 px, got {value}"),
        default=1024,
        metavar="PX",
        help="tile side, in pixels at the model's resolution",
    )
    p.add_argument(
        "--halo",
        type=checked(int, lambda n: n >= 0, WSI_LIMITS),
        default=64,
        metavar="PX",
        help="context read around each tile (model pixels); must exceed the largest nucleus",
    )
    p.add_argument(
        "--workers",
        type=checked(int, lambda n: n >= 0, WSI_LIMITS),
        default=None,
        help="processes post-processing tiles (nuclei, polygons, measurements), plus one reading tiles per "
        "4 of them; 0: all in one process (default: 0 on a CPU, 4/5 of the CPU cores with a GPU)",
    )
    _add_tta(p)
    _add_device(p, batch_size_limit=WSI_LIMITS)
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="K/N",
        help="predict only the K-th of N stable shares of the sorted slide list (one job of a job array each, "
        "e.g. K=$SLURM_ARRAY_TASK_ID); all N may write one --out",
    )
    p.add_argument(
        "--dask",
        type=parse_dask,
        default=None,
        metavar="SCHEDULER",
        help="one task per slide on a Dask cluster: its scheduler's address (tcp://host:8786), or local:N for N "
        "worker processes here (needs pip install 'cdcl[cluster]')",
    )
    p.add_argument(
        "--resources",
        type=parse_resources,
        default=None,
        metavar="NAME=N",
        help="Dask worker resources each slide's task takes, e.g. GPU=1 (with --dask)",
    )
    p.set_defaults(handler="cdcl.commands.predict_wsi:run")


def add_cohort(sub: Subparsers) -> None:
    p = sub.add_parser("cohort", help="one table of the slides in a predict-wsi output folder, and a histogram")
    p.add_argument("out", metavar="OUT_DIR", help="a folder `cdcl predict-wsi` writes or wrote")
    p.add_argument(
        "slides",
        nargs="*",
        metavar="SLIDE",
        help="the slide files or folders of the cohort: those without any output are listed as missing",
    )
    p.set_defaults(handler="cdcl.commands.cohort:run")


SUBCOMMANDS = (
    add_demo,
    add_data,
    add_tiles,
    add_split,
    add_train,
    add_evaluate,
    add_export,
    add_predict,
    add_predict_wsi,
    add_cohort,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdcl",
        description="Semi-supervised nucleus segmentation for H&E histopathology (CDCL, CVPR 2022): "
        "train from a few annotated tiles plus many unannotated ones, evaluate, and predict on tiles, "
        "folders and whole-slide images.",
        epilog="Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the file and the problem).",
    )
    parser.add_argument("--version", action="version", version=f"cdcl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def command_name(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` ("data check" for the data actions), for one-line error messages."""
    words = [word for word in argv if not word.startswith("-")]  # the global options take no value
    return " ".join(words[:2]) if words[:1] == ["data"] else " ".join(words[:1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CdclError as err:  # a range check of an option's type=
        print(f"cdcl {command_name(argv)}: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        getattr(args, "show_help", parser.print_help)()
        return 2
    module_name, func_name = handler.split(":")
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))  # e.g. "data check"
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except CdclError as err:
        print(f"cdcl {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdcl {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
