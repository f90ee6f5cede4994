"""Speed and memory of cdcl on the cpu-small preset: the dense contrastive loss against its naive reference,
seconds per training iteration per method, peak memory of a training step, and inference throughput.

Writes benchmarks/results/speed.json (every number, the command, git commit, machine, torch, threads, load
average) and speed.md (tables). Everything compared is measured side by side in one run, interleaved
(round-robin), so a load change on a shared machine hits every contender alike: trust the ratios more than the
absolute seconds.

    python benchmarks/speed.py                                   # full run (~10 min on 1 busy core)
    python benchmarks/speed.py --checkpoint runs/x/best.pt       # trained weights: realistic post-processing
    python benchmarks/speed.py --quick                           # smoke run, small sizes, ~1-2 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cdcl.methods.cdcl as cdcl_method  # noqa: E402
from cdcl.config import Config, load_config  # noqa: E402
from cdcl.inference.window import pad_to, sliding_window_probability, window_layout  # noqa: E402
from cdcl.instances.postprocess import PostprocessParams, instances_from_maps  # noqa: E402
from cdcl.io import write_json_atomic, write_text_atomic  # noqa: E402
from cdcl.methods import build_method  # noqa: E402
from cdcl.methods.infonce import InfoNCE  # noqa: E402
from cdcl.methods.losses import patch_contrastive_loss  # noqa: E402
from cdcl.models import build_model  # noqa: E402
from cdcl.training.engine import build_optimizer, update_ema  # noqa: E402
from cdcl.vocab import METHODS  # noqa: E402
from cdcl.wsi.worker import tile_nuclei_json  # noqa: E402

from provenance import torch_timing_header  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TEST_IMAGES = REPO.parent / "shared" / "data" / "monuseg" / "test" / "images"
TRAIN_MASKS = REPO.parent / "shared" / "data" / "monuseg" / "train" / "masks"
BATCH, CROP = 8, 128
NO_CONTRASTIVE = "cdcl (w_contr=0)"


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(seconds(fn) for _ in range(repeats))


# ---------------------------------------------------------------- 1. dense contrastive loss vs the naive loop


def contrastive_inputs(n: int, m: int, d: int, seed: int = 0) -> dict:
    """Random L2-normalised embeddings, binary labels and patch ratios (half of them 0 or 1, like real FC)."""
    gen = torch.Generator().manual_seed(seed)

    def unit(rows: int) -> torch.Tensor:
        return F.normalize(torch.randn(rows, d, generator=gen), dim=1)

    def fc(rows: int) -> torch.Tensor:
        dominant = torch.randint(0, 2, (rows,), generator=gen).float()
        return torch.where(torch.rand(rows, generator=gen) < 0.5, torch.rand(rows, generator=gen), dominant)

    return {
        "anchors": unit(n),
        "positives": unit(n),
        "bank": unit(m),
        "anchor_labels": torch.randint(0, 2, (n,), generator=gen),
        "bank_labels": torch.randint(0, 2, (m,), generator=gen),
        "anchor_fc": fc(n),
        "bank_fc": fc(m),
    }


def bench_contrastive(sizes: list[tuple[int, int, int]], train_size: tuple[int, int, int], repeats: int) -> list[dict]:
    """Seconds of the dense loss and of the naive loop at equal inputs, and their largest per-anchor difference.

    The training-size row (anchors x bank of a real CDCL step) times the dense loss alone, forward and
    forward+backward: the naive loop would take many minutes there.
    """
    from cdcl.testing.contrastive import naive_patch_contrastive_loss

    hyper = {"temperature": 0.1, "bdp": 0.2, "fdp": 0.8}
    rows = []
    for n, m, d in sizes:
        x = contrastive_inputs(n, m, d)
        fast = patch_contrastive_loss(**x, **hyper)
        naive: list[float] = []
        naive_s = seconds(lambda: naive.extend(naive_patch_contrastive_loss(*x.values(), **hyper)))
        fast_s = median_seconds(lambda: patch_contrastive_loss(**x, **hyper), repeats)
        fast64 = patch_contrastive_loss(
            **{k: v.double() if v.is_floating_point() else v for k, v in x.items()}, **hyper
        )
        naive_t = torch.tensor(naive, dtype=torch.float64)
        rows.append(
            {
                "anchors": n,
                "bank": m,
                "dim": d,
                "seconds_dense": fast_s,
                "seconds_naive": naive_s,
                "speedup": naive_s / fast_s,
                "mean_loss": float(naive_t.mean()),
                "max_abs_diff_float32": float((fast.double() - naive_t).abs().max()),
                "max_abs_diff_float64": float((fast64 - naive_t).abs().max()),
            }
        )
    n, m, d = train_size
    x = contrastive_inputs(n, m, d)
    x["anchors"].requires_grad_(True)

    def forward_backward() -> None:
        patch_contrastive_loss(**x, **hyper).mean().backward()

    with torch.no_grad():
        forward_s = median_seconds(lambda: patch_contrastive_loss(**x, **hyper), repeats)
    rows.append(
        {
            "anchors": n,
            "bank": m,
            "dim": d,
            "seconds_dense": forward_s,
            "seconds_dense_forward_backward": median_seconds(forward_backward, repeats),
            "seconds_naive": None,
        }
    )
    return rows


# ---------------------------------------------------------------- 2. seconds per training iteration


def method_config(name: str, extra: tuple[str, ...] = ()) -> Config:
    """cpu-small with every unlabeled term active from the first step (no warm-up, threshold 0)."""
    return load_config(
        None, [f"method.name={name}", "method.warmup_iters=0", "method.threshold=0.0", "train.device=cpu", *extra]
    )


def random_batches(seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(3, BATCH, 3, CROP, CROP, generator=gen)
    labeled = {"image": images[0], "target": torch.randint(0, 2, (BATCH, CROP, CROP), generator=gen)}
    strong2 = torch.rand(BATCH, 3, CROP, CROP, generator=gen)  # UniMatch's second strong view
    return labeled, {"weak": images[1], "strong": images[2], "strong2": strong2}


def monuseg_foreground(seed: int = 0) -> torch.Tensor:
    """(BATCH, CROP, CROP) float nucleus masks of random crops of the first MoNuSeg training images."""
    from cdcl.data.images import read_foreground

    gen = np.random.default_rng(seed)
    crops = []
    for path in sorted(TRAIN_MASKS.iterdir())[:BATCH]:
        mask = read_foreground(path)
        y, x = (int(gen.integers(0, size - CROP + 1)) for size in mask.shape)
        crops.append(mask[y : y + CROP, x : x + CROP])
    return torch.from_numpy(np.stack(crops)).float()


@contextlib.contextmanager
def pseudo_labels_from_masks(foreground: torch.Tensor) -> Iterator[None]:
    """CDCL's contrastive pseudo-labels taken from real nucleus masks, as a trained model would give them. The
    random-weight model predicts one class everywhere, which leaves every anchor without negatives and makes the
    contrastive term far cheaper than in a real run."""
    probabilities = torch.stack([1 - foreground, foreground], dim=1)
    original = cdcl_method.CDCL._label_probs
    cdcl_method.CDCL._label_probs = lambda self, out, size: F.adaptive_avg_pool2d(probabilities, size)
    try:
        yield
    finally:
        cdcl_method.CDCL._label_probs = original


class Trainer:
    """One method's student, EMA teacher, optimizer and step counter; ``step`` mirrors the loop of
    ``cdcl.training.engine``."""

    def __init__(self, config: Config) -> None:
        torch.manual_seed(0)  # every method starts from the same weights
        self.config = config
        self.student = build_model(config.model).train()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.method = build_method(config.method)
        self.optimizer = build_optimizer(self.student, config)
        self.iteration = 0
        self.stats: dict[str, float] = {}

    def step(self, labeled: dict, unlabeled: dict) -> None:
        cfg = self.config
        terms = self.method.losses(
            self.student, self.teacher, labeled, unlabeled if self.method.uses_unlabeled else None, self.iteration
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        update_ema(self.teacher, self.student, self.iteration, cfg.method.ema_decay)
        self.iteration += 1
        self.stats = {k: float(v) for k, v in terms.items() if k.startswith("stat/")}


class Stopwatch:
    """Wraps a function and adds up the seconds spent in it (for the contrastive term inside a CDCL step)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def bench_training(warmup: int, timed: int) -> dict:
    """Median seconds per step of each method (and CDCL without its contrastive term), measured round-robin."""
    trainers = {name: Trainer(method_config(name)) for name in METHODS}
    trainers[NO_CONTRASTIVE] = Trainer(method_config("cdcl", ("method.w_contr=0",)))
    labeled, unlabeled = random_batches()
    watch, watch_backward = Stopwatch(cdcl_method.cross_patch_contrastive), Stopwatch(InfoNCE.backward)
    cdcl_method.cross_patch_contrastive, InfoNCE.backward = watch, watch_backward
    times: dict[str, list[float]] = {name: [] for name in trainers}
    contrastive_forward: list[float] = []
    contrastive_backward: list[float] = []
    loads = []
    try:
        with pseudo_labels_from_masks(monuseg_foreground()):
            for round_ in range(warmup + timed):
                for name, trainer in trainers.items():
                    watch.seconds = watch_backward.seconds = 0.0
                    elapsed = seconds(lambda: trainer.step(labeled, unlabeled))
                    if round_ >= warmup:
                        times[name].append(elapsed)
                        if name == "cdcl":
                            contrastive_forward.append(watch.seconds)
                            contrastive_backward.append(watch_backward.seconds)
                loads.append(os.getloadavg()[0])
    finally:
        cdcl_method.cross_patch_contrastive, InfoNCE.backward = watch.fn, watch_backward.fn
    median = {name: statistics.median(t) for name, t in times.items()}
    full, without = median["cdcl"], median[NO_CONTRASTIVE]
    loss_seconds = statistics.median(f + b for f, b in zip(contrastive_forward, contrastive_backward))
    return {
        "batch": {"labeled": BATCH, "unlabeled": BATCH, "crop": CROP},
        "warmup_steps": warmup,
        "timed_steps": timed,
        "seconds_per_step": median,
        "all_step_seconds": times,
        "ratio_to_supervised": {name: s / median["supervised"] for name, s in median.items()},
        "cdcl_contrastive_forward_seconds": statistics.median(contrastive_forward),
        "cdcl_contrastive_forward_share": statistics.median(contrastive_forward) / full,
        "cdcl_contrastive_forward_backward_seconds": loss_seconds,
        "cdcl_contrastive_forward_backward_share": loss_seconds / full,
        "cdcl_contrastive_total_seconds": full - without,
        "cdcl_contrastive_total_share": (full - without) / full,
        "cdcl_stats_last_step": trainers["cdcl"].stats,
        "loadavg_1min_per_round": loads,
    }


# ---------------------------------------------------------------- 3. peak memory of a training step


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:"))


def memory_child(name: str, steps: int) -> dict:
    """In a fresh process: RSS after building the models, then the peak over ``steps`` training steps.

    The peak is the kernel's high-water mark of this process's memory (VmHWM, what ``ru_maxrss`` reports for a
    process started from a small shell). ``ru_maxrss`` itself is not used: Linux carries it over from the forked
    parent across exec, so a child of this (large) benchmark process would report the parent's peak.
    """
    config = method_config(name)
    trainer = Trainer(config)
    labeled, unlabeled = random_batches()
    after_build = proc_status_kb("VmRSS")
    with pseudo_labels_from_masks(monuseg_foreground()):
        for _ in range(steps):
            trainer.step(labeled, unlabeled)
    peak = proc_status_kb("VmHWM")
    return {
        "rss_after_build_mb": after_build / 1024,
        "peak_rss_mb": peak / 1024,
        "step_peak_over_build_mb": (peak - after_build) / 1024,
        "steps": steps,
    }


def bench_memory(steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = {}
    for name in METHODS:
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child-memory",
                name,
                "--steps",
                str(steps),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {name} failed:\n{proc.stderr[-3000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- 4. inference


def inference_model(checkpoint: str | None) -> tuple[torch.nn.Module, Config, PostprocessParams, str]:
    if checkpoint:
        from cdcl.inference.predictor import load_predictor

        predictor = load_predictor(checkpoint, device="cpu")
        return predictor.model, predictor.config, predictor.postprocess, checkpoint
    config = method_config("supervised")
    torch.manual_seed(0)
    return build_model(config.model).eval(), config, PostprocessParams(), "random init (cpu-small)"


def bench_inference(checkpoint: str | None, image_name: str | None, repeats: int) -> dict:
    """Sliding-window MP/s against the bare forward pass on the same windows, and post-processing time."""
    from cdcl.data.images import read_image

    model, config, params, source = inference_model(checkpoint)
    path = TEST_IMAGES / image_name if image_name else sorted(TEST_IMAGES.iterdir())[0]
    image = read_image(path)
    infer = config.infer
    win_h, win_w, corners = window_layout(*image.shape[:2], infer.window, infer.overlap)
    padded = pad_to(image, win_h, win_w)
    crops = torch.from_numpy(np.stack([padded[y : y + win_h, x : x + win_w] for y, x in corners]))
    batches = [
        crops[i : i + infer.batch_size].permute(0, 3, 1, 2).float() / 255
        for i in range(0, len(crops), infer.batch_size)
    ]

    def sliding() -> np.ndarray:
        return sliding_window_probability(
            model, image, window=infer.window, overlap=infer.overlap, batch_size=infer.batch_size, device="cpu"
        )

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    sliding(), bare()  # warm-up
    sliding_s, bare_s = [], []
    for _ in range(repeats):  # interleaved; the minimum is the least disturbed by other processes
        sliding_s.append(seconds(sliding))
        bare_s.append(seconds(bare))
    prob = sliding()
    post_s = [seconds(lambda: instances_from_maps(prob, params)) for _ in range(repeats)]
    whole = (0, 0, image.shape[1], image.shape[0])
    tile_s = [seconds(lambda: tile_nuclei_json(prob, image, params, whole, whole, 1.0)) for _ in range(repeats)]
    megapixels = image.shape[0] * image.shape[1] / 1e6
    sliding_min, bare_min, post_min = min(sliding_s), min(bare_s), min(post_s)
    return {
        "model": source,
        "image": path.name,
        "image_px": list(image.shape[:2]),
        "window": infer.window,
        "overlap": infer.overlap,
        "batch_size": infer.batch_size,
        "windows": len(corners),
        "repeats": repeats,
        "seconds_sliding_window_all": sliding_s,
        "seconds_bare_forward_all": bare_s,
        "seconds_postprocess_all": post_s,
        "seconds_sliding_window": sliding_min,
        "seconds_bare_forward": bare_min,
        "seconds_postprocess": post_min,
        "megapixels_per_s_sliding_window": megapixels / sliding_min,
        "megapixels_per_s_bare_forward": megapixels / bare_min,
        "sliding_over_bare_throughput": bare_min / sliding_min,
        "seconds_wsi_tile_postprocess_all": tile_s,
        "seconds_wsi_tile_postprocess": min(tile_s),
        "nuclei": int(instances_from_maps(prob, params).max()),
        "postprocess_params": params.to_dict(),
        "megapixels_per_s_end_to_end": megapixels / (sliding_min + post_min),
    }


# ---------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Speed and memory (cpu-small preset)",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: {r['git_commit']}  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} torch thread(s); "
        f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']}; total {r['seconds_total']:.0f} s.",
        "",
        f"Other work shared the machine (1-minute load average {r['loadavg_start'][0]} on {m['cpu_count']} CPUs at "
        "the start): absolute seconds are only indicative; the ratios compare contenders measured side by side "
        "(interleaved) in the same run.",
        "",
        "## Dense contrastive loss vs the naive loop (`cdcl/testing/contrastive.py`)",
        "",
        "| anchors N | bank M | dim D | dense s | naive s | speed-up | max abs diff (float32) | max abs diff "
        "(float64) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["contrastive"]:
        if row["seconds_naive"] is None:
            continue
        lines.append(
            f"| {row['anchors']} | {row['bank']} | {row['dim']} | {fmt(row['seconds_dense'], 4)} | "
            f"{fmt(row['seconds_naive'], 2)} | {row['speedup']:.0f}x | {row['max_abs_diff_float32']:.2e} | "
            f"{row['max_abs_diff_float64']:.2e} |"
        )
    big = r["contrastive"][-1]
    lines += [
        "",
        f"At the training size (N={big['anchors']} anchors, M={big['bank']} bank entries, D={big['dim']}) "
        f"the dense loss takes {fmt(big['seconds_dense'])} s forward and "
        f"{fmt(big['seconds_dense_forward_backward'])} s forward+backward (naive: not run, far too slow).",
        "",
    ]
    t = r["training"]
    lines += [
        "## Seconds per training iteration",
        "",
        f"Batch: {t['batch']['labeled']} labeled + {t['batch']['unlabeled']} unlabeled crops of "
        f"{t['batch']['crop']}x{t['batch']['crop']}, random tensors; warm-up 0 and threshold 0 so every term is "
        f"active; {t['warmup_steps']} warm-up rounds, median of {t['timed_steps']} timed rounds, methods "
        "interleaved round-robin.",
        "",
        "| method | s / iteration | ratio to supervised |",
        "|---|---|---|",
    ]
    for name, s in t["seconds_per_step"].items():
        lines.append(f"| {name} | {s:.3f} | {t['ratio_to_supervised'][name]:.2f}x |")
    lines += [
        "",
        "CDCL without its contrastive term (a teacher forward on the unlabeled batch plus a student "
        "forward+backward on twice the images) is the floor of CDCL / supervised.",
        "The contrastive pseudo-labels of CDCL come from MoNuSeg training masks (crops of the first "
        f"{t['batch']['unlabeled']} images), as a trained model would give them: the random-weight model predicts "
        "one class everywhere, which would leave every anchor without negatives. Last step: "
        f"{t['cdcl_stats_last_step'].get('stat/n_anchors', 0):.0f} anchors, "
        f"{t['cdcl_stats_last_step'].get('stat/n_negatives', 0):.0f} negatives per anchor on average out of "
        f"{t['cdcl_stats_last_step'].get('stat/bank_size', 0):.0f} bank entries.",
        "",
        f"Contrastive term inside a CDCL step: forward of `cross_patch_contrastive` "
        f"{t['cdcl_contrastive_forward_seconds']:.3f} s ({100 * t['cdcl_contrastive_forward_share']:.1f}% of the "
        f"step); with the loss's backward pass {t['cdcl_contrastive_forward_backward_seconds']:.3f} s "
        f"({100 * t['cdcl_contrastive_forward_backward_share']:.1f}%); whole term including the projector head and "
        f"its backward, estimated as CDCL minus CDCL with w_contr=0: {t['cdcl_contrastive_total_seconds']:.3f} s "
        f"({100 * t['cdcl_contrastive_total_share']:.1f}%; step-to-step noise makes this the rougher number).",
        "",
    ]
    lines += [
        "## Peak memory of a training step",
        "",
        f"Each method in a fresh process, {next(iter(r['memory'].values()))['steps']} training steps; peak = the "
        "process's resident high-water mark (`VmHWM`; `ru_maxrss` would include the forking parent's peak).",
        "",
        "| method | RSS after model construction (MB) | peak RSS (MB) | peak - after construction (MB) |",
        "|---|---|---|---|",
    ]
    for name, mem in r["memory"].items():
        lines.append(
            f"| {name} | {mem['rss_after_build_mb']:.0f} | {mem['peak_rss_mb']:.0f} | "
            f"{mem['step_peak_over_build_mb']:.0f} |"
        )
    i = r["inference"]
    lines += [
        "",
        "## Inference (CPU)",
        "",
        f"Model: {i['model']}; image `{i['image']}` ({i['image_px'][0]}x{i['image_px'][1]}); window {i['window']}, "
        f"overlap {i['overlap']}, batch {i['batch_size']}, {i['windows']} windows; fastest of {i['repeats']} "
        "interleaved "
        "repeats (the least disturbed by the other processes).",
        "",
        "| stage | seconds / image | megapixels / s |",
        "|---|---|---|",
        f"| bare forward pass (same windows, pre-cut) | {i['seconds_bare_forward']:.2f} | "
        f"{i['megapixels_per_s_bare_forward']:.3f} |",
        f"| sliding_window_probability | {i['seconds_sliding_window']:.2f} | "
        f"{i['megapixels_per_s_sliding_window']:.3f} |",
        f"| instances_from_maps | {i['seconds_postprocess']:.2f} | - |",
        f"| predict-wsi's per-tile post-processing (`tile_nuclei_json`: instances, measurements, polygons, "
        f"JSON) | {i['seconds_wsi_tile_postprocess']:.2f} | - |",
        f"| sliding window + post-processing | {i['seconds_sliding_window'] + i['seconds_postprocess']:.2f} | "
        f"{i['megapixels_per_s_end_to_end']:.3f} |",
        "",
        f"Sliding-window / bare forward throughput: {i['sliding_over_bare_throughput']:.2f}. "
        f"Nuclei found: {i['nuclei']}"
        + (
            " (random weights: post-processing time is not representative)." if i["model"].startswith("random") else "."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few steps")
    parser.add_argument("--checkpoint", default=None, help="trained weights for the inference part (default: random)")
    parser.add_argument("--image", default=None, help="MoNuSeg test image name (default: the first one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: share a busy machine fairly)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {RESULTS.relative_to(REPO)}; with --quick a temporary folder)",
    )
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(memory_child(args.child_memory, args.steps)))
        return 0
    quick = args.quick
    start, load_start = time.perf_counter(), os.getloadavg()
    cdcl_cfg = method_config("cdcl").method
    bank = (cdcl_cfg.bank_capacity + 1) * 2 * cdcl_cfg.num_bank_samples
    embed = method_config("cdcl").model.embed_dim
    sizes = [(16, 256, 64)] if quick else [(64, 1024, 64), (256, 4096, 64), (256, 4096, 128), (1024, 8192, 64)]
    result = {
        **torch_timing_header("benchmarks/speed.py", sys.argv[1:]),
        "loadavg_start": [round(x, 2) for x in load_start],
        "quick": quick,
    }
    print("contrastive loss ...", flush=True)
    result["contrastive"] = bench_contrastive(sizes, (cdcl_cfg.num_anchors, bank, embed), 3 if quick else 5)
    print("training steps ...", flush=True)
    # warm-up until the memory bank is full, so timed CDCL steps see the steady-state bank
    result["training"] = bench_training(warmup=1 if quick else cdcl_cfg.bank_capacity + 1, timed=2 if quick else 7)
    print("memory ...", flush=True)
    result["memory"] = bench_memory(steps=2 if quick else 3, threads=args.threads)
    print("inference ...", flush=True)
    result["inference"] = bench_inference(args.checkpoint, args.image, 1 if quick else 5)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds_total"] = time.perf_counter() - start
    out = args.out or (Path(tempfile.mkdtemp(prefix="cdcl-speed-")) if quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "speed.json", result)
    write_text_atomic(out / "speed.md", markdown(result))
    print(markdown(result))
    print(f"written: {out / 'speed.json'}, {out / 'speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
