"""Peak memory and throughput of `cdcl predict-wsi` on a small and a 16x larger pyramidal TIFF.

Builds two all-tissue slides (default 4096^2 and 16384^2 px, 0.25 um/px) by tiling the real MoNuSeg training
images, runs `cdcl predict-wsi` on each under `/usr/bin/time -v`, and writes benchmarks/results/wsi_memory.json
and .md with:

- peak resident memory per run: GNU time's "Maximum resident set size" (the largest single process), and the
  peak summed over the whole process tree (main + DataLoader readers + post-processing pool), sampled from
  /proc every 0.2 s; the check is large/small <= 1.3;
- end-to-end throughput: tile-core megapixels per second of the prediction phase, from the run's <slide>_summary.json
  (slide opening, model loading and the final GeoJSON/CSV/overlay writing are reported separately);
- the model's bare forward-pass throughput on the same tiles: each slide's tiles with their halo, cut into
  exactly the windows and batches sliding_window_probability uses, already on the device, timed with the
  device synchronised: every other tile just before that slide's run and the rest just after it, so the two
  passes cover every tile once and last as long together as the run's forward passes (a short sample of a
  shared machine's drifting speed made the ratio swing by 0.15 between runs); the check is end-to-end / bare
  >= 0.8, bare being all the tiles' megapixels over both passes' seconds. Each pass holds its windows in memory
  (about 3.6 GB for the 16k slide's half), so the sizes are meant for benchmarking, not for arbitrary slides.

    python benchmarks/wsi_memory.py --checkpoint runs/x/best.pt [--device cuda] [--workers 8]
    python benchmarks/wsi_memory.py --stand-in --sizes 2048 8192      # pipeline only, no trained model

`--stand-in` replaces the checkpoint by the pointwise stand-in model of cdcl/testing/slides.py: it measures the
streaming machinery (reading, stitching, post-processing, writing) but not a real network.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cdcl.inference.window import autocast, pad_to, window_layout  # noqa: E402
from cdcl.io import write_json_atomic, write_text_atomic  # noqa: E402
from cdcl.wsi.grid import Grid  # noqa: E402
from cdcl.wsi.readers import choose_level, open_slide  # noqa: E402

from provenance import git_commit  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
STAND_IN_WINDOW = 256


def build_slide(folder: Path, side: int, compression: str, data: Path = SHARED_DATA) -> Path:
    """An all-tissue side x side pyramidal TIFF of MoNuSeg tiles (JPEG tiles by default, like scanner output);
    one already in ``folder`` (``--keep``) is reused."""
    from cdcl.testing.slides import monuseg_mosaic, write_pyramid

    path = folder / f"monuseg_{side}.tif"
    if path.is_file():
        return path
    partial = path.with_name(f"{path.stem}.partial.tif")  # renamed when complete: never reuse a killed build
    write_pyramid(partial, monuseg_mosaic(data, side, side), mpp=0.25, compression=compression)
    partial.rename(path)
    return path


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (kB), from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_predict_wsi(slide: Path, out: Path, args: argparse.Namespace, checkpoint: str) -> dict:
    """One `cdcl predict-wsi` run under /usr/bin/time -v; peak RSS (largest process and whole tree) + summary.

    Without /usr/bin/time (a bare GPU machine) only the process-tree peak sampled from /proc is reported."""
    cli = (
        [sys.executable, str(Path(__file__).resolve()), "--child-stand-in"]
        if args.stand_in
        else [sys.executable, "-m", "cdcl.cli"]
    )
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    command = [
        *timer,
        *cli,
        "predict-wsi",
        "--checkpoint",
        checkpoint,
        str(slide),
        "--out",
        str(out),
        "--tile",
        str(args.tile),
        "--halo",
        str(args.halo),
        "--device",
        args.device,
    ]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    shutil.rmtree(out, ignore_errors=True)  # a run killed in an earlier --keep folder would otherwise be resumed
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak_tree = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak_tree[0] = max(peak_tree[0], tree_rss_kb(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: every process in it was waited for
    cpu_seconds = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"predict-wsi failed on {slide.name}:\n{stderr[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    summary = json.loads((out / f"{slide.stem}_summary.json").read_text())
    return {
        "slide_px": summary["level0_size"],
        "tiles": summary["tiles"]["tissue"],
        "nuclei": summary["nuclei"],
        "workers": summary["workers"],
        "peak_rss_mb": round(int(found.group(1)) / 1024, 1) if found else None,
        "peak_tree_rss_mb": round(peak_tree[0] / 1024, 1),
        "megapixels": summary["megapixels_predicted"],
        "seconds_predict": summary["seconds_predict"],
        "seconds_command": round(wall, 2),
        "megapixels_per_s": summary["megapixels_per_s"],
        "megapixels_per_s_command": round(summary["megapixels_predicted"] / wall, 3),
        "cpu_seconds_command": round(cpu_seconds, 1),
        "cpu_seconds_per_tile": round(cpu_seconds / summary["tiles"]["predicted_now"], 3),
    }


def window_batches(predictor, slide: Path, tile: int, halo: int, half: int) -> tuple[list[torch.Tensor], dict]:
    """Every other tile of the slide (``half`` 0: the first, third, ...; 1: the second, fourth, ...) with its
    halo, cut into exactly the windows and batches sliding_window_probability uses, already on the device; and
    their tile count, window count and tile-core megapixels."""
    reader = open_slide(slide)
    grid = Grid.for_slide(reader, *choose_level(reader, predictor.mpp), tile, halo)
    cores = grid.cores()[half::2]
    batches, megapixels = [], 0.0
    for core in cores:
        image = grid.read(reader, grid.box(core))
        win_h, win_w, corners = window_layout(*image.shape[:2], predictor.window, predictor.overlap)
        image = pad_to(image, win_h, win_w)
        crops = np.stack([image[y : y + win_h, x : x + win_w] for y, x in corners])
        for i in range(0, len(crops), predictor.batch_size):
            batches.append(
                torch.from_numpy(crops[i : i + predictor.batch_size]).to(predictor.device).permute(0, 3, 1, 2).float()
                / 255
            )
        megapixels += (core[2] - core[0]) * (core[3] - core[1]) / 1e6
    return batches, {"tiles": len(cores), "windows": sum(len(b) for b in batches), "megapixels": round(megapixels, 3)}


def forward_seconds(predictor, batches: list[torch.Tensor]) -> float:
    """One timed pass of the model alone over ``batches``, the device synchronised before and after."""
    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(predictor.device, predictor.amp):
        sync()
        start = time.perf_counter()
        for batch in batches:
            predictor.model(batch)
        sync()
    return time.perf_counter() - start


def load(args: argparse.Namespace):
    if args.stand_in:
        from cdcl.testing.slides import stand_in_predictor

        return stand_in_predictor(window=STAND_IN_WINDOW, batch_size=args.batch_size or 8)
    from cdcl.inference.predictor import load_predictor

    return load_predictor(args.checkpoint, device=args.device, batch_size=args.batch_size)


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "wsi_memory.json", result)
    small, large = result["runs"]
    lines = [
        "# predict-wsi: peak memory and throughput",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']}; device: {result['device']}; {result['cpus']} CPUs; torch {result['torch']}; "
        f"tile {result['tile']}, workers {result['workers']}",
        "",
        "| slide (px) | tissue tiles | nuclei | peak RSS, largest process (MB) | peak RSS, process tree (MB) | "
        "predict MP/s | command MP/s | predict s | command s | CPU s (command) | CPU s per tile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['slide_px'][0]} x {r['slide_px'][1]} | {r['tiles']} | {r['nuclei']} | {r['peak_rss_mb']} | "
            f"{r['peak_tree_rss_mb']} | {r['megapixels_per_s']} | {r['megapixels_per_s_command']} | "
            f"{r['seconds_predict']} | {r['seconds_command']} | {r['cpu_seconds_command']} | "
            f"{r['cpu_seconds_per_tile']} |"
        )
    small_bare, large_bare = result["bare_forward"]
    lines += [
        "",
        f"- Peak RSS ratio large/small: **{result['rss_ratio']}** (largest process), {result['tree_rss_ratio']} "
        "(process tree); target <= 1.3: "
        f"{'met' if (result['rss_ratio'] or result['tree_rss_ratio']) <= 1.3 else 'NOT met'}.",
        f"- Bare forward pass over each slide's own tiles, every other tile just before its run and the rest just "
        f"after: small slide, {small_bare['tiles']} tiles ({small_bare['windows']} windows) in "
        f"{small_bare['seconds']} s, "
        f"{small_bare['megapixels_per_s']} MP/s (before / after: "
        f"{' / '.join(map(str, small_bare['megapixels_per_s_before_after']))}); "
        f"large slide, {large_bare['tiles']} tiles ({large_bare['windows']} windows) in {large_bare['seconds']} s, "
        f"{large_bare['megapixels_per_s']} MP/s (before / after: "
        f"{' / '.join(map(str, large_bare['megapixels_per_s_before_after']))}).",
        f"- End-to-end / bare throughput: **{result['throughput_ratio']}** (large slide, prediction phase); "
        f"{result['throughput_ratio_small']} (small slide); target >= 0.8: "
        f"{'met' if result['throughput_ratio'] >= 0.8 else 'NOT met'}.",
        f"- CPU per tile, all processes, start-up cancelled out (large minus small slide): "
        f"{result['cpu_seconds_per_extra_tile']} core-s; with {result['cpus']} CPUs at most "
        f"{round(result['cpus'] / result['cpu_seconds_per_extra_tile'], 1)} tiles/s.",
        "",
        "Megapixels are tile-core pixels at the model's resolution. 'predict' times the tile loop (read, "
        "predict, post-process, journal); 'command' is the whole process: start-up, model loading, tissue mask, "
        "and writing GeoJSON, CSV and overlay. CPU seconds are user + system time of the whole process tree "
        "(start-up and writing included): the CPU a slide needs, whatever the accelerator.",
    ]
    write_text_atomic(out_dir / "wsi_memory.md", "\n".join(lines) + "\n")


def child_stand_in(argv: list[str]) -> int:
    """`cdcl <argv>` with the stand-in predictor in place of the checkpoint (``--stand-in`` runs)."""
    import cdcl.commands.predict_wsi
    from cdcl.cli import main
    from cdcl.testing.slides import stand_in_predictor

    cdcl.commands.predict_wsi.load_predictor = lambda path, device, batch_size: stand_in_predictor(
        window=STAND_IN_WINDOW, batch_size=batch_size or 8
    )
    return main(argv)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-stand-in":
        return child_stand_in(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a checkpoint written by `cdcl train`")
    model.add_argument("--stand-in", action="store_true", help="pipeline only: the pointwise stand-in model")
    parser.add_argument("--sizes", type=int, nargs=2, default=[4096, 16384], metavar=("SMALL", "LARGE"))
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="predict-wsi --workers (default: its own)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder holding monuseg/ (the slides' tiles)")
    parser.add_argument(
        "--compression", default="jpeg", help="slide tile compression (zlib where imagecodecs is missing)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="build slides and outputs here and keep them (slides found there are reused)",
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cdcl-wsi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint = args.checkpoint or str(work / "stand-in.pt")
        if args.stand_in:
            Path(checkpoint).write_bytes(b"stand-in model: see cdcl/testing/slides.py")
        slides = [build_slide(work, side, args.compression, args.data) for side in args.sizes]
        predictor = load(args)
        runs, bare = [], []
        for slide in slides:
            # half the slide's tiles just before its run and half just after, so a machine whose speed drifts
            # (a shared VM) weighs on the bare pass as on the run
            passes = []
            for half in (0, 1):
                batches, tiles = window_batches(predictor, slide, args.tile, args.halo, half)
                if not runs and not half:
                    forward_seconds(predictor, batches[:8])  # warm-up: cuDNN autotuning, allocator
                passes.append({**tiles, "seconds": forward_seconds(predictor, batches)})
                del batches
                if not half:
                    runs.append(run_predict_wsi(slide, work / f"out_{slide.stem}", args, checkpoint))
            megapixels, seconds = sum(p["megapixels"] for p in passes), sum(p["seconds"] for p in passes)
            bare.append(
                {
                    "tiles": sum(p["tiles"] for p in passes),
                    "windows": sum(p["windows"] for p in passes),
                    "megapixels": round(megapixels, 3),
                    "seconds": round(seconds, 3),
                    "megapixels_per_s": round(megapixels / seconds, 3),
                    "megapixels_per_s_before_after": [
                        round(p["megapixels"] / p["seconds"], 3) if p["tiles"] else None for p in passes
                    ],
                }
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    device = (
        torch.cuda.get_device_name(predictor.device)
        if predictor.device.type == "cuda"
        else platform.processor() or "cpu"
    )
    result = {
        "command": " ".join(["python", "benchmarks/wsi_memory.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "platform": platform.platform(),
        "load_average_at_end": list(os.getloadavg()),
        "model": "stand-in (pointwise, cdcl/testing/slides.py)" if args.stand_in else args.checkpoint,
        "device": device,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "tile": args.tile,
        "halo": args.halo,
        "workers": runs[0]["workers"],
        "window": predictor.window,
        "batch_size": predictor.batch_size,
        "amp": predictor.amp,
        "runs": runs,
        "bare_forward": bare,
        "rss_ratio": round(runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3) if runs[0]["peak_rss_mb"] else None,
        "tree_rss_ratio": round(runs[1]["peak_tree_rss_mb"] / runs[0]["peak_tree_rss_mb"], 3),
        "throughput_ratio": round(runs[1]["megapixels_per_s"] / bare[1]["megapixels_per_s"], 3),
        "throughput_ratio_small": round(runs[0]["megapixels_per_s"] / bare[0]["megapixels_per_s"], 3),
        # start-up cancels out: the CPU each further tile costs, across every process
        "cpu_seconds_per_extra_tile": round(
            (runs[1]["cpu_seconds_command"] - runs[0]["cpu_seconds_command"]) / (runs[1]["tiles"] - runs[0]["tiles"]), 3
        ),
    }
    write_report(result, args.out)
    print((args.out / "wsi_memory.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
