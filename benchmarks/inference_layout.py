"""CPU inference with the weights in channels-last memory layout (what ``cdcl.checkpoint.load_predictor`` does on
a CPU) against PyTorch's default contiguous layout, for both presets' networks.

Per preset: its U-Net (cpu-small: the ``--checkpoint`` weights, or random ones; paper: DenseNet-161, random
weights, as none can be downloaded here) in both layouts, timed on the same batches of windows (the preset's
window and inference batch), interleaved round-robin, fastest of the repeats; and the largest difference between
the two layouts' logits. Writes benchmarks/results/inference_layout.{json,md}.

    python benchmarks/inference_layout.py --checkpoint CKPT          # ~3 min on 2 cores
    python benchmarks/inference_layout.py --quick                    # cpu-small only, 1 batch, to a temporary folder
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from cdcl.checkpoint import load_predictor
from cdcl.config import load_config
from cdcl.io import write_json_atomic, write_text_atomic
from cdcl.models import build_model
from provenance import git_commit
from speed import machine

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def preset_model(preset: str, checkpoint: Path | None) -> tuple[torch.nn.Module, int, int, str]:
    """(contiguous model in eval mode, window, batch size, where its weights come from)."""
    config = load_config(None, [f"preset={preset}"])
    if checkpoint is not None and preset == "cpu-small":
        predictor = load_predictor(checkpoint, device="cpu")
        model, source = predictor.model.to(memory_format=torch.contiguous_format), checkpoint.name
    else:
        config.model.pretrained = False
        torch.manual_seed(0)
        model, source = build_model(config.model).eval(), "random weights"
    return model, config.infer.window, config.infer.batch_size, source


def bench_preset(preset: str, checkpoint: Path | None, batches: int, repeats: int) -> dict:
    contiguous, window, batch_size, source = preset_model(preset, checkpoint)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(batch_size, 3, window, window, generator=generator) for _ in range(batches)]
    models = {"contiguous": contiguous, "channels_last": channels_last}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(inputs[0])  # warm-up: oneDNN builds its kernels on the first call
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for batch in inputs:
                    model(batch)
                seconds[name].append(time.perf_counter() - start)
        diff = max(float((contiguous(b)["logits"] - channels_last(b)["logits"]).abs().max()) for b in inputs)
    best = {name: min(values) for name, values in seconds.items()}
    megapixels = batches * batch_size * window * window / 1e6
    return {"preset": preset, "weights": source, "window": window, "batch_size": batch_size, "batches": batches,
            "seconds_all": seconds, "seconds": best, "megapixels_per_s": {n: megapixels / s for n, s in best.items()},
            "speedup": best["contiguous"] / best["channels_last"], "max_abs_logit_diff": diff}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# CPU inference: channels-last vs contiguous weights", "",
             f"Command: `{r['command']}`  ", f"Commit: {r['git_commit']}  ",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} torch thread(s); "
             f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']}; total {r['seconds_total']:.0f} s.", "",
             f"Forward passes of each preset's U-Net on the same random windows; the two layouts interleaved, fastest "
             f"of {r['repeats']} rounds.", "",
             "| preset | weights | window x batch | batches | contiguous s | channels-last s | speed-up | max abs logit diff |",
             "|---|---|---|---|---|---|---|---|"]
    for p in r["presets"]:
        lines.append(f"| {p['preset']} | {p['weights']} | {p['window']} x {p['batch_size']} | {p['batches']} | "
                     f"{p['seconds']['contiguous']:.3f} | {p['seconds']['channels_last']:.3f} | {p['speedup']:.2f}x | "
                     f"{p['max_abs_logit_diff']:.1e} |")
    return "\n".join([*lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="cpu-small weights (default: random ones)")
    parser.add_argument("--quick", action="store_true", help="smoke run: cpu-small only, 1 batch, 1 round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the fastest counts")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; with --quick a temporary folder)")
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()
    presets = ["cpu-small"] if args.quick else ["cpu-small", "paper"]
    batches, repeats = (1, 1) if args.quick else (3, args.repeats)
    result = {"command": " ".join(["python", "benchmarks/inference_layout.py", *sys.argv[1:]]), "git_commit": git_commit(),
              "machine": machine(), "loadavg_start": [round(x, 2) for x in load_start], "repeats": repeats,
              "presets": []}
    for preset in presets:
        result["presets"].append(bench_preset(preset, args.checkpoint, batches, repeats))
        print(result["presets"][-1], flush=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds_total"] = time.perf_counter() - start
    out = args.out or (Path(tempfile.mkdtemp(prefix="cdcl-inference-layout-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "inference_layout.json", result)
    write_text_atomic(out / "inference_layout.md", markdown(result))
    print(markdown(result))
    print(f"written: {out / 'inference_layout.json'}, {out / 'inference_layout.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
