"""How well does ``--mpp auto`` find an image's scale? MoNuSeg test tiles rescaled by known factors.

Each 250 px tile of the MoNuSeg test images is resized by a known factor (0.5x-2x: nuclei that much larger, as
at another magnification) and run through ``--mpp auto`` (``cdcl.inference.resolution.auto_instances``): the
estimated factor is the inverse of the scale it settles on. "first pass" is the estimate of the first
prediction alone (measured over trained nucleus size). Beside them, the same statistic on the ground truth
resized by the factor (nearest neighbour): the error left with perfect predictions, i.e. how far a tile's
nuclei differ from the training set's. With ``--score``, Dice and AJI of every tile predicted at its own
pixels, with the true ``--mpp`` and with ``--mpp auto``, each scored at the tile's own (resized) resolution.

    python benchmarks/resolution.py --checkpoint runs/monuseg/1-16/seed0/supervised/best.pt --score

A checkpoint from before the nucleus size was stored gets what training stores now: the model's nuclei predicted
on its split's val images (the labeled masks' size without val).
Writes benchmarks/results/resolution.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cdcl.checkpoint import load_checkpoint
from cdcl.data import load_dataset
from cdcl.data.splits import read_split_file
from cdcl.inference.predictor import Predictor, load_predictor, predict_instances
from cdcl.inference.resolution import auto_instances, predict_at, rescale_image, resize_labels
from cdcl.instances.sizes import nucleus_diameter
from cdcl.io import write_json_atomic, write_text_atomic
from cdcl.metrics import evaluate_pair

from provenance import accelerator_machine, git_commit

REPO = Path(__file__).resolve().parents[1]
FACTORS = (0.5, 0.67, 1.0, 1.5, 2.0)
TILE = 250  # the semi-supervised protocol's MoNuSeg tiles
WITHIN = 0.15  # the error the issue accepts
METHODS = ("native", "true_mpp", "auto")  # how a tile is predicted when scored


def training_diameter(predictor: Predictor, checkpoint: Path) -> tuple[float, str]:
    """The nucleus size the checkpoint stores, else (a checkpoint from before it did) what training would have
    stored: the model's nuclei predicted on its split's val images (the labeled masks' without val)."""
    stored = load_checkpoint(checkpoint)
    if stored.get("predicted_nucleus_diameter") or stored.get("nucleus_diameter"):
        return predictor.nucleus_diameter, "checkpoint"
    data = predictor.config.data
    dataset = load_dataset(data.root, data.format)
    val = dataset.subset(read_split_file(Path(data.split_dir) / "val.txt", dataset))
    if val:
        return nucleus_diameter(predict_instances(predictor, it.image)[1] for it in val), "predictions on val.txt"
    labeled = dataset.subset(read_split_file(Path(data.split_dir) / "labeled.txt", dataset))
    return nucleus_diameter(it.instances for it in labeled), f"labeled masks of {data.split_dir}"


def monuseg_tiles(root: Path, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, instances) of the 250 px tiles of the MoNuSeg test images (the first ``limit`` images)."""
    tiles = []
    for item in list(load_dataset(root, "monuseg"))[:limit]:
        image, labels = item.image, item.instances
        for y in range(0, image.shape[0] - TILE + 1, TILE):
            for x in range(0, image.shape[1] - TILE + 1, TILE):
                crop = (slice(y, y + TILE), slice(x, x + TILE))
                tiles.append((f"{item.name}_y{y}_x{x}", image[crop], labels[crop]))
    return tiles


_predictor: Predictor | None = None  # one per worker process


def _load(checkpoint: Path, device: str, tta: str | None, trained: float) -> None:
    global _predictor
    torch.set_num_threads(1)
    _predictor = load_predictor(checkpoint, device, tta=tta)
    _predictor.nucleus_diameter = trained


def measure_tile(job: tuple) -> dict:
    """One tile resized by ``factor``: the first-pass and final ``--mpp auto`` estimates, the ground truth's,
    and (``score``) Dice and AJI of each way of predicting it."""
    name, image, truth, factor, score = job
    predictor, side = _predictor, round(TILE * factor)
    image, truth = rescale_image(image, side / TILE), resize_labels(truth, (side, side))
    trained = predictor.nucleus_diameter
    native = predict_instances(predictor, image)[1]
    first, truth_size = nucleus_diameter([native]), nucleus_diameter([truth])
    labels, scale = auto_instances(predictor, image, name)
    row = {
        "tile": name,
        "factor": factor,
        "first_pass": None if first is None else first / trained,
        "estimate": 1 / scale,
        "truth": None if truth_size is None else truth_size / trained,
    }
    if score:
        predictions = {"native": native, "true_mpp": predict_at(predictor, image, predictor.mpp / factor)[0]}
        for method, pred in {**predictions, "auto": labels}.items():
            scores = evaluate_pair(truth, pred)
            row[method] = {"dice": scores["dice"], "aji": scores["aji"]}
    return row


def summarise(rows: list[dict], factor: float) -> dict:
    out = {"factor": factor, "tiles": len(rows)}
    for key in ("estimate", "first_pass", "truth"):
        found = np.array([r[key] for r in rows if r[key] is not None])
        errors = np.abs(found / factor - 1)
        out[key] = {
            "median_estimate": float(np.median(found)),
            "median_error": float(np.median(errors)),
            "p90_error": float(np.percentile(errors, 90)),
            "within_15pct": float(np.mean(errors <= WITHIN)),
            "estimated_tiles": int(found.size),
        }
    if "auto" in rows[0]:
        for method in METHODS:
            out[method] = {k: float(np.mean([r[method][k] for r in rows])) for k in ("dice", "aji")}
    return out


def markdown(result: dict) -> str:
    lines = [
        "# `--mpp auto`: estimated vs true rescale factor on MoNuSeg test tiles",
        "",
        f"Command: `{result['command']}`  ",
        f"Checkpoint: `{result['checkpoint']}` (trained at {result['model_mpp']} um/px, tta {result['tta']}); "
        f"training nucleus size {result['training_diameter']:.2f} px ({result['training_diameter_source']}"
        f"); {result['tiles']} tiles of {TILE} px; commit {result['commit']}.",
        "",
        "Estimated factor: how much larger the tile's nuclei are than the training ones. Error: |estimate / true - 1|. "
        "'auto': the scale `--mpp auto` settles on (up to 4 passes); 'first pass': the first prediction's nucleus "
        "size alone; 'truth': the ground truth's size (perfect predictions: the tiles' own spread).",
        "",
        "| true factor | auto: median estimate | auto: median error | auto: p90 error | auto: within 15% "
        "| first pass: median estimate | first pass: within 15% | truth: median estimate | truth: within 15% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        a, f, t = s["estimate"], s["first_pass"], s["truth"]
        lines.append(
            f"| {s['factor']:g}x | {a['median_estimate']:.3f} | {a['median_error']:.1%} | {a['p90_error']:.1%} | "
            f"{a['within_15pct']:.0%} | {f['median_estimate']:.3f} | {f['within_15pct']:.0%} | "
            f"{t['median_estimate']:.3f} | {t['within_15pct']:.0%} |"
        )
    if "auto" in result["summary"][0]:
        lines += [
            "",
            "Mean per-tile scores, each at the resized tile's own resolution:",
            "",
            "| true factor | Dice native | Dice true --mpp | Dice --mpp auto | AJI native | AJI true --mpp | "
            "AJI --mpp auto |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in result["summary"]:
            lines.append(
                f"| {s['factor']:g}x | " + " | ".join(f"{s[m][k]:.3f}" for k in ("dice", "aji") for m in METHODS) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a MoNuSeg best.pt (with data.mpp)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "monuseg" / "test")
    parser.add_argument("--images", type=int, default=None, help="only the first N test images (default: all 14)")
    parser.add_argument("--score", action="store_true", help="also score native, true --mpp and --mpp auto")
    parser.add_argument("--tta", default=None, help="test-time augmentation (default: the checkpoint's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="processes, one tile each at a time (default: 2)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    predictor = load_predictor(args.checkpoint, args.device, tta=args.tta)
    trained, source = training_diameter(predictor, args.checkpoint)
    tiles = monuseg_tiles(args.data, args.images)
    jobs = [(name, image, truth, factor, args.score) for factor in FACTORS for name, image, truth in tiles]
    setup = (args.checkpoint, args.device, args.tta, trained)
    with multiprocessing.get_context("spawn").Pool(args.workers, _load, setup) as pool:
        per_tile = list(tqdm(pool.imap(measure_tile, jobs), total=len(jobs), unit="tile"))
    summary = [summarise([r for r in per_tile if r["factor"] == f], f) for f in FACTORS]
    result = {
        "command": " ".join(["python", "benchmarks/resolution.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": accelerator_machine(),
        "checkpoint": str(args.checkpoint),
        "model_mpp": predictor.mpp,
        "tta": predictor.tta,
        "device": str(predictor.device),
        "training_diameter": trained,
        "training_diameter_source": source,
        "tiles": len(tiles),
        "summary": summary,
        "per_tile": per_tile,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "resolution.json", result)
    write_text_atomic(args.out / "resolution.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
