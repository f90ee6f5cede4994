"""Scaling of `cdcl predict-wsi` over a cohort: one plain command vs `--dask local:1` vs `--dask local:2` vs two
`--shard K/2` commands run at once, on the same slides, with a check that every route writes byte-identical
GeoJSON, CSV and overlay files to the plain run's.

Slides: N small pyramidal TIFFs (default 8) cut from the real MoNuSeg training images at 0.5 um/px. Model: an
untrained network of the CPU preset's shape (ResNet-18 encoder; cdcl/testing/slides.py), the real checkpoint
loader and pipeline: the figures time the machinery, not a trained model's quality. Each route runs as its own
`cdcl predict-wsi` process (Dask's worker start-up, which imports torch in every worker, is part of its time).
Per-slide seconds are the `seconds` of each slide's summary (cohort.csv), summed over the slides.

    python benchmarks/cohort.py [--slides 8] [--size 768] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cdcl.testing.slides import monuseg_mosaic, write_pyramid, write_untrained_checkpoint

from provenance import REPO, git_commit, machine

RESULTS = REPO / "benchmarks" / "results"
PRODUCTS = (".geojson", "_nuclei.csv", "_overlay.png")
MODEL = ["model.encoder=resnet18", "model.decoder_channels=[32,32,32]", "infer.window=256", "data.mpp=0.5"]
ROUTES = {
    "plain": [[]],
    "dask local:1": [["--dask", "local:1"]],
    "dask local:2": [["--dask", "local:2"]],
    "two shards at once": [["--shard", "1/2"], ["--shard", "2/2"]],
}


def make_slides(folder: Path, count: int, size: int, data: Path) -> None:
    mosaic = monuseg_mosaic(data, size, size * count // 2)
    for i in range(count):  # different tissue in each
        y = (i * size // 2) % (mosaic.shape[0] - size + 1)
        write_pyramid(folder / f"slide{i:02d}.tif", np.ascontiguousarray(mosaic[y : y + size, :size]), mpp=0.5)


def run_route(base: list[str], extras: list[list[str]], out: Path) -> dict:
    """The route's commands started together; wall time until the last one ends."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen([*base, "--out", str(out), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for extra in extras
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"failed ({proc.returncode}): {err.decode()[-2000:]}")
    wall = time.perf_counter() - start
    rows = list(csv.DictReader(open(out / "cohort.csv")))
    assert all(row["status"] == "finished" for row in rows), rows
    return {"wall_s": round(wall, 2), "slide_s_sum": round(sum(float(row["seconds"]) for row in rows), 2)}


def identical(a: Path, b: Path) -> bool:
    stems = [p.name.removesuffix("_summary.json") for p in a.glob("*_summary.json")]
    return bool(stems) and all(
        (a / f"{s}{x}").read_bytes() == (b / f"{s}{x}").read_bytes() for s in stems for x in PRODUCTS
    )


def markdown(result: dict) -> str:
    lines = [
        "# predict-wsi over a cohort: plain vs Dask vs shards",
        "",
        f"Command: `{result['command']}`  ",
        f"Commit: {result['commit']}; machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs; "
        f"device {result['device']}  ",
        f"{result['slides']} slides of {result['size']} x {result['size']} px at 0.5 um/px (tile {result['tile']}), "
        "an untrained ResNet-18 U-Net of the CPU preset's shape.",
        "",
        "| route | wall s | per slide s (wall / slides) | sum of slide s | outputs identical to plain |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["routes"].items():
        lines.append(
            f"| {name} | {row['wall_s']} | {row['wall_s'] / result['slides']:.2f} | {row['slide_s_sum']} | "
            f"{row['identical']} |"
        )
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=768, help="slide side in pixels")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--note", default="", help="a sentence on the conditions (e.g. other work on the machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cohort")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "slides").mkdir()
        make_slides(work / "slides", args.slides, args.size, args.data)
        checkpoint = write_untrained_checkpoint(work / "model.pt", MODEL)
        base = [sys.executable, "-m", "cdcl.cli", "predict-wsi", "--checkpoint", str(checkpoint)]
        base += [str(work / "slides"), "--tile", str(args.tile), "--device", args.device]
        routes = {}
        for name, extras in ROUTES.items():
            out = work / name.replace(" ", "_").replace(":", "")
            routes[name] = run_route(base, extras, out)
            routes[name]["identical"] = identical(work / "plain", out)
            print(name, routes[name], flush=True)
    result = {
        "command": shlex.join(["python", "benchmarks/cohort.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(omp_num_threads=os.environ.get("OMP_NUM_THREADS")),
        "device": args.device,
        "slides": args.slides,
        "size": args.size,
        "tile": args.tile,
        "routes": routes,
        "note": args.note,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
