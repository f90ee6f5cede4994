"""Exact-mode contrastive loss against the released computation: ``patch_contrastive_loss`` and
``released_loss.released_contrastive_loss`` on the same inputs, forward + backward, CPU, float32.

Inputs: L2-normalised random embeddings, binary labels, and patch foreground ratios like real ones (half of them
0 or 1, the rest multiples of 1/64, the share of nucleus pixels in an 8x8 patch), so FC sums are exact and the
released rule (no slack) and ours select the same negatives. The two run interleaved in one process, several
repeats, median; values are compared per anchor and on the anchors' gradient. Writes
benchmarks/results/contrastive_exact.{json,md}.

    OMP_NUM_THREADS=1 python benchmarks/contrastive_exact.py            # 1024 anchors x 65,536 bank rows
    OMP_NUM_THREADS=1 python benchmarks/contrastive_exact.py --quick    # small sizes, to a temporary folder
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cdcl.io import write_json_atomic, write_text_atomic
from cdcl.methods.losses import patch_contrastive_loss

from provenance import torch_timing_header
from released_loss import released_contrastive_loss

RESULTS = Path(__file__).resolve().parent / "results"
HYPER = {"temperature": 0.1, "bdp": 0.2, "fdp": 0.8}


def inputs(n: int, m: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def fc(rows: int) -> torch.Tensor:
        dominant = torch.randint(0, 2, (rows,), generator=gen).float()
        share = torch.randint(0, 65, (rows,), generator=gen).float() / 64
        return torch.where(torch.rand(rows, generator=gen) < 0.5, share, dominant)

    return {
        "anchors": F.normalize(torch.randn(n, d, generator=gen), dim=1),
        "positives": F.normalize(torch.randn(n, d, generator=gen), dim=1),
        "bank": F.normalize(torch.randn(m, d, generator=gen), dim=1),
        "anchor_labels": torch.randint(0, 2, (n,), generator=gen),
        "bank_labels": torch.randint(0, 2, (m,), generator=gen),
        "anchor_fc": fc(n),
        "bank_fc": fc(m),
    }


def forward_backward(loss_fn, data: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of forward + backward of the mean loss; the per-anchor loss and the anchors' gradient."""
    anchors = data["anchors"].clone().requires_grad_()
    start = time.perf_counter()
    loss = loss_fn(anchors, *list(data.values())[1:], **HYPER)
    loss.mean().backward()
    return time.perf_counter() - start, loss.detach(), anchors.grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", type=int, default=1024)
    parser.add_argument("--bank", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=64, help="embedding width (cpu-small: 64)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256 x 4096, 3 repeats, results to a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    n, m, repeats = (256, 4096, 3) if args.quick else (args.anchors, args.bank, args.repeats)
    data = inputs(n, m, args.dim)
    contenders = {"released": released_contrastive_loss, "cdcl": patch_contrastive_loss}
    load_start = os.getloadavg()
    for fn in contenders.values():  # warm-up
        forward_backward(fn, data)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            seconds[name].append(forward_backward(fn, data)[0])
    exact = functools.partial(released_contrastive_loss, eps=0.0)  # the release's eps shifts large losses
    _, want, want_grad = forward_backward(exact, data)
    _, got, got_grad = forward_backward(patch_contrastive_loss, data)
    sizable = want.abs() > 1e-3
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        **torch_timing_header("benchmarks/contrastive_exact.py", sys.argv[1:]),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "anchors": n,
        "bank": m,
        "dim": args.dim,
        "dtype": "float32",
        **HYPER,
        "repeats": repeats,
        "seconds_forward_backward_all": seconds,
        "seconds_forward_backward": median,
        "speedup": median["released"] / median["cdcl"],
        "mean_loss": float(want.mean()),
        "max_abs_diff": float((got - want).abs().max()),
        "max_rel_diff_where_above_1e-3": float(((got - want).abs() / want.abs())[sizable].max()),
        "grad_rel_diff": float((got_grad - want_grad).norm() / want_grad.norm()),
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="cdcl-contrastive-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "contrastive_exact.json", result)
    write_text_atomic(out / "contrastive_exact.md", markdown(result))
    print(markdown(result))
    print(f"written: {out / 'contrastive_exact.json'}, {out / 'contrastive_exact.md'}")
    return 0


def markdown(r: dict) -> str:
    m, s = r["machine"], r["seconds_forward_backward"]
    return "\n".join(
        [
            "# Exact-mode contrastive loss vs the released computation",
            "",
            f"Command: `{r['command']}`  ",
            f"Commit: {r['git_commit']}  ",
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} torch thread(s); "
            f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']}.",
            "",
            f"{r['anchors']} anchors x {r['bank']} bank rows, D={r['dim']}, {r['dtype']}, temperature "
            f"{r['temperature']}, bdp {r['bdp']}, fdp {r['fdp']}; forward + backward of the mean loss (gradient to the "
            f"anchors); median of {r['repeats']} interleaved repeats.",
            "",
            "| loss | s (forward + backward) |",
            "|---|---|",
            f"| released computation (`benchmarks/released_loss.py`) | {s['released']:.3f} |",
            f"| `cdcl.methods.losses.patch_contrastive_loss` | {s['cdcl']:.3f} |",
            "",
            f"Speed-up: {r['speedup']:.2f}x. Values against the released computation with its eps set to 0 (its "
            "eps = 1e-8, added to a positive share of e^-10 or less, moves large losses by up to ~1e-3): mean loss "
            f"{r['mean_loss']:.4f}, largest absolute difference "
            f"{r['max_abs_diff']:.2e}, largest relative difference where the loss exceeds 1e-3 "
            f"{r['max_rel_diff_where_above_1e-3']:.2e}; anchors' gradient: relative difference (norm) "
            f"{r['grad_rel_diff']:.2e}.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
