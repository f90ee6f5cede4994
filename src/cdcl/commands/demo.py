"""``cdcl demo``: the whole story on embedded synthetic data, in a few minutes on a laptop CPU.

Synthetic H&E-like tiles -> a split with few labels -> a supervised and a CDCL model trained briefly ->
both evaluated on held-out tiles -> a printed table, training curves and a comparison picture.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cdcl.config import load_config
from cdcl.data import load_dataset
from cdcl.data.splits import Split, write_split
from cdcl.data.synthetic import write_synthetic_dataset
from cdcl.inference.evaluation import SUMMARY_KEYS, evaluate_items, format_table
from cdcl.inference.predictor import load_predictor, predict_instances
from cdcl.io import ensure_writable_dir, write_text_atomic
from cdcl.training.engine import train
from cdcl.viz import plot_comparison_grid

N_IMAGES, N_LABELED, N_VAL, N_TEST = 32, 4, 3, 6
DEMO_ITERATIONS = 100


def demo_overrides(data_dir: Path, split_dir: Path, method: str, iterations: int) -> list[str]:
    """cpu-small preset, shortened: 4 labeled + 4 unlabeled crops of 128 px per step, CPU, short warm-up."""
    return [
        f"data.root={data_dir}",
        "data.format=folder",
        f"data.split_dir={split_dir}",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.unlabeled_batch_size=4",
        f"method.name={method}",
        f"train.iterations={iterations}",
        f"train.val_every={iterations}",
        "train.log_every=10",
        "train.device=cpu",
        f"method.warmup_iters={iterations // 4}",
        f"method.ramp_iters={iterations // 2}",
        "method.bank_capacity=2",
        "method.num_anchors=256",
        "method.num_bank_samples=512",
        "optim.lr=0.002",
    ]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = ensure_writable_dir(args.out)
    iterations = args.iterations or DEMO_ITERATIONS
    data_dir = out / "data"
    if not (data_dir / "images").is_dir():
        print(f"writing {N_IMAGES} synthetic H&E-like tiles to {data_dir}")
        write_synthetic_dataset(data_dir, N_IMAGES, seed=0, size=256)
    names = [item.name for item in load_dataset(data_dir, "folder")]
    test, val = names[:N_TEST], names[N_TEST : N_TEST + N_VAL]
    rest = names[N_TEST + N_VAL :]
    split_dir = out / "split"
    write_split(Split(labeled=rest[:N_LABELED], unlabeled=rest[N_LABELED:], val=val, test=test), split_dir)
    print(f"split: {N_LABELED} labeled, {len(rest) - N_LABELED} unlabeled, {N_VAL} val, {N_TEST} test tiles")

    results, predictors = {}, {}
    for method in ("supervised", "cdcl"):
        run_dir = out / f"run_{method}"
        config = load_config(None, demo_overrides(data_dir, split_dir, method, iterations))
        print(f"training {method} for {iterations} iterations -> {run_dir}")
        train(config, run_dir)
        predictors[method] = load_predictor(run_dir / "best.pt", "cpu")
        dataset = load_dataset(data_dir, "folder")
        results[method] = evaluate_items(
            predictors[method], dataset.subset(test), out / f"eval_{method}", progress=False
        )

    table = format_table(results)
    write_text_atomic(out / "results.md", table)
    write_text_atomic(out / "results.json", json.dumps({m: r["mean"] for m, r in results.items()}, indent=2) + "\n")
    item = load_dataset(data_dir, "folder").item(test[0])
    panels = [("ground truth", item.instances)] + [
        (m, predict_instances(p, item.image)[1]) for m, p in predictors.items()
    ]
    plot_comparison_grid(item.image, panels, out / "comparison.png")
    print()
    print(table, end="")
    gain = {k: results["cdcl"]["mean"][k] - results["supervised"]["mean"][k] for k in ("dice", "aji")}
    print(
        f"\nCDCL - supervised: Dice {gain['dice']:+.3f}, AJI {gain['aji']:+.3f} "
        f"(synthetic data, {iterations} iterations: a smoke test of the pipeline, not a benchmark)"
    )
    print(f"pictures: {out / 'comparison.png'}, {out / 'run_cdcl' / 'curves.png'}, {out / 'eval_cdcl' / 'overlays'}")
    print(f"done in {time.perf_counter() - start:.0f} s; metrics keys: {', '.join(SUMMARY_KEYS)}")
    return 0
