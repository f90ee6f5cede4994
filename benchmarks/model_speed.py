"""The instance model against the paper's model: sliding-window throughput, post-processing time and seconds
per supervised training step, on the cpu-small preset, measured side by side (interleaved, round-robin).

Writes benchmarks/results/model_speed.json (every number, the command, commit and machine) and model_speed.md.

    python benchmarks/model_speed.py                 # 3 MoNuSeg test images, 5 repeats (~5 min on 1 core)
    python benchmarks/model_speed.py --quick         # smoke run into a temporary folder
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cdcl.config import load_config
from cdcl.data.images import read_image
from cdcl.inference.window import sliding_window_probability
from cdcl.instances.postprocess import instances_from_maps
from cdcl.instances.representations import make_targets
from cdcl.io import write_json_atomic, write_text_atomic
from cdcl.methods import build_method
from cdcl.models import build_model

from provenance import git_commit, machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TEST_IMAGES = REPO.parent / "shared" / "data" / "monuseg" / "test" / "images"
MODELS = {
    "paper (binary, stride 4)": ["model.output_stride=4", "model.instances=binary"],
    "default (three_class, stride 1)": [],
    "distance, stride 1": ["model.instances=distance"],
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_step(config, model) -> callable:
    """One supervised step (forward, loss, backward) on a fixed batch of 8 random 128 px crops with targets."""
    method = build_method(config.method, config.model.instances)
    rng = np.random.default_rng(0)
    instances = np.zeros((8, 128, 128), np.int32)
    for i in range(8):
        for k in range(1, 12):
            y, x = rng.integers(10, 118, 2)
            instances[i, y - 6 : y + 6, x - 6 : x + 6] = k
    targets = [make_targets(m, config.model.instances) for m in instances]
    batch = {"image": torch.rand(8, 3, 128, 128)}
    batch.update({k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]})

    def step() -> None:
        model.train()
        loss = method.losses(model, model, batch, None, 0)["total"]
        model.zero_grad(set_to_none=True)
        loss.backward()

    return step


def run(images: list[Path], repeats: int) -> dict:
    torch.manual_seed(0)
    configs = {name: load_config(None, sets) for name, sets in MODELS.items()}
    models = {name: build_model(c.model).eval() for name, c in configs.items()}
    pictures = [read_image(p) for p in images]
    infer = next(iter(configs.values())).infer
    megapixels = sum(p.shape[0] * p.shape[1] for p in pictures) / 1e6
    maps: dict[str, list[np.ndarray]] = {}

    def slide(name: str) -> None:
        models[name].eval()
        maps[name] = [
            sliding_window_probability(
                models[name], p, window=infer.window, overlap=infer.overlap, batch_size=infer.batch_size, device="cpu"
            )
            for p in pictures
        ]

    steps = {name: training_step(configs[name], models[name]) for name in MODELS}
    timings: dict[str, dict[str, list[float]]] = {n: {"sliding": [], "post": [], "step": []} for n in MODELS}
    for name in MODELS:  # warm-up
        slide(name)
        steps[name]()
    for _ in range(repeats):
        for name in MODELS:
            timings[name]["sliding"].append(seconds(lambda: slide(name)))
            timings[name]["post"].append(seconds(lambda: [instances_from_maps(m) for m in maps[name]]))
            timings[name]["step"].append(seconds(steps[name]))
    base = next(iter(MODELS))
    rows = {}
    for name, t in timings.items():
        rows[name] = {
            "megapixels_per_s_sliding_window": megapixels / min(t["sliding"]),
            "seconds_postprocess_per_image": min(t["post"]) / len(pictures),
            "seconds_per_training_step": min(t["step"]),
            "throughput_vs_paper_model": min(timings[base]["sliding"]) / min(t["sliding"]),
            "step_time_vs_paper_model": min(t["step"]) / min(timings[base]["step"]),
            "all_seconds": t,
        }
    return {
        "images": [p.name for p in images],
        "megapixels": megapixels,
        "repeats": repeats,
        "models": rows,
        "window": infer.window,
        "overlap": infer.overlap,
        "batch_size": infer.batch_size,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}`; commit {result['git_commit']}; {m['cpu']} ({m['cpu_count']} CPUs), torch "
        f"{m['torch']}, {m['torch_threads']} thread(s), load average {result['loadavg_start'][0]:.1f} at the start.",
        f"{len(result['images'])} MoNuSeg test images ({result['megapixels']:.1f} MP), window {result['window']}, "
        f"batch {result['batch_size']}; best of {result['repeats']} interleaved repeats; random weights "
        "(post-processing times depend on the weights: see speed.md for a trained model).",
        "",
        "| model | sliding window MP/s | vs paper model | post-processing s/image | s per supervised step "
        "(8 x 128 px) | vs paper model |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['megapixels_per_s_sliding_window']:.3f} | {r['throughput_vs_paper_model']:.2f}x | "
            f"{r['seconds_postprocess_per_image']:.3f} | {r['seconds_per_training_step']:.3f} | "
            f"{r['step_time_vs_paper_model']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one image, one repeat, into a temporary folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = sorted(TEST_IMAGES.iterdir())[: 1 if args.quick else 3]
    result = {
        "command": " ".join(["python", "benchmarks/model_speed.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "loadavg_start": list(os.getloadavg()),
    }
    result.update(run(images, 1 if args.quick else 5))
    out = args.out or (Path(tempfile.mkdtemp(prefix="cdcl-model-speed-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "model_speed.json", result)
    write_text_atomic(out / "model_speed.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
