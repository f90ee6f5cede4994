"""How good are the teacher's pseudo-labels on the unlabeled tiles? A diagnostic for the label-budget sweep.

Consistency and contrastive terms only teach what the teacher gets right where it is confident. MoNuSeg's
"unlabeled" tiles do have ground truth, so we can measure, per confidence threshold: the share of pixels that
pass it (coverage), their pixel accuracy, and the share of the model's errors that lie among them (errors the
unlabeled terms would reinforce) and outside them (errors they cannot teach away, being masked out).

    python benchmarks/pseudo_labels.py --run runs/monuseg/1-16/seed0/supervised --run runs/monuseg/1-16/seed0/cdcl

Writes benchmarks/results/pseudo_labels.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cdcl.config import load_config
from cdcl.data import load_dataset, read_image
from cdcl.data.splits import read_split_file
from cdcl.inference.predictor import load_predictor
from cdcl.inference.window import foreground_of, sliding_window_probability
from cdcl.io import write_json_atomic, write_text_atomic

from provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.7, 0.9, 0.95)


def teacher_stats(run: Path, thresholds: tuple[float, ...]) -> dict:
    """Pixel statistics of the run's best.pt (the EMA teacher) on its split's unlabeled tiles."""
    config = load_config(run / "config.yaml")
    predictor = load_predictor(run / "best.pt", "auto")
    dataset = load_dataset(config.data.root, config.data.format)
    tiles = dataset.subset(read_split_file(Path(config.data.split_dir) / "unlabeled.txt", dataset))
    by_image = defaultdict(list)
    for tile in tiles:
        by_image[tile.image_path].append(tile)
    counts = {t: np.zeros(4) for t in thresholds}  # confident, confident & right, wrong, wrong & confident
    pixels = 0
    for path, group in tqdm(by_image.items(), desc=run.name, unit="image"):
        image = read_image(path)  # the whole image once: its tiles share the sliding-window context
        prob = foreground_of(sliding_window_probability(predictor.model, image, **predictor.window_options()))
        truth = group[0].mask.read(image.shape[:2]) > 0
        for tile in group:
            y0, y1, x0, x1 = tile.window
            p, gt = prob[y0:y1, x0:x1], truth[y0:y1, x0:x1]
            confidence, right = np.maximum(p, 1 - p), (p > 0.5) == gt
            pixels += p.size
            for t in thresholds:
                sure = confidence > t
                counts[t] += [sure.sum(), (sure & right).sum(), (~right).sum(), (sure & ~right).sum()]
    rows = []
    for t in thresholds:
        sure, sure_right, wrong, wrong_sure = counts[t]
        rows.append(
            {
                "threshold": t,
                "coverage": sure / pixels,
                "confident_accuracy": sure_right / max(sure, 1),
                "errors_confident": wrong_sure / max(wrong, 1),
                "pixel_accuracy": 1 - wrong / pixels,
            }
        )
    return {
        "run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run),
        "method": config.method.name,
        "tiles": len(tiles),
        "pixels": pixels,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "# Teacher pseudo-labels on the unlabeled tiles (ground truth known)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| run | threshold | coverage | accuracy of confident pixels | share of errors that are confident | "
        "pixel accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for r in run["rows"]:
            lines.append(
                f"| {run['run']} | {r['threshold']} | {r['coverage']:.3f} | {r['confident_accuracy']:.4f} | "
                f"{r['errors_confident']:.3f} | {r['pixel_accuracy']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", type=Path, required=True, help="a run folder (config.yaml + best.pt)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    result = {
        "command": " ".join(["python", "benchmarks/pseudo_labels.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "runs": [teacher_stats(run.resolve(), THRESHOLDS) for run in args.run],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "pseudo_labels.json", result)
    write_text_atomic(args.out / "pseudo_labels.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
