"""Speed of the nucleus exports (``cdcl.instances.export``) against the code they replaced, on real MoNuSeg label maps:
``label_perimeters`` vs ``regionprops_table(..., "perimeter")``, ``nuclei_table`` vs per-pixel moments with the
regionprops perimeter (``reference_table`` in cdcl/testing/exports.py), and ``nuclei_polygons`` vs the per-nucleus
``find_contours`` loop (``reference_polygons``). Every output is compared with the old one: polygons and table rows
must be identical.

Writes benchmarks/results/export_speed.json (every number, the command, git commit, machine, load average) and
export_speed.md (the table). Old and new run side by side, interleaved (round-robin), on each label map; each
takes the fastest of its repeats (the least disturbed by other processes on a shared machine).

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py              # 30 training masks + a 1152x1152 mosaic, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --quick      # 3 masks, 1 repeat, to a temporary folder
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import skimage  # noqa: E402
from skimage.measure import find_contours, regionprops_table  # noqa: E402

from cdcl.data import read_image, read_label_image  # noqa: E402
from cdcl.instances import export  # noqa: E402
from cdcl.io import write_json_atomic, write_text_atomic  # noqa: E402
from cdcl.testing.exports import reference_polygons, reference_table  # noqa: E402

from provenance import git_commit, machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TRAIN = REPO.parent / "shared" / "data" / "monuseg" / "train"
MOSAIC = 1152  # a predict-wsi tile: 1024 px core + 64 px halo on each side


def regionprops_perimeters(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The perimeters as ``nuclei_table`` computed them before: one regionprops region at a time."""
    table = regionprops_table(labels, properties=("label", "perimeter"))
    return table["label"], table["perimeter"]


def whole_foreground_contours(labels: np.ndarray) -> list[np.ndarray]:
    """One find_contours call on all nuclei at once: what any batching of find_contours calls costs at least."""
    return find_contours(np.pad(labels > 0, 1).astype(np.float32), 0.5, fully_connected="high")


STEPS: dict[str, tuple[Callable, Callable]] = {
    "perimeter": (
        lambda labels, image: regionprops_perimeters(labels),
        lambda labels, image: export.label_perimeters(labels),
    ),
    "nuclei_table": (reference_table, export.nuclei_table),
    "nuclei_polygons": (
        lambda labels, image: reference_polygons(labels),
        lambda labels, image: export.nuclei_polygons(labels),
    ),
}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_map(labels: np.ndarray, image: np.ndarray, repeats: int) -> dict:
    """Fastest of ``repeats`` interleaved runs of every step, old and new, and whether their outputs agree."""
    seconds: dict[str, list[float]] = {f"{step}_{version}": [] for step in STEPS for version in ("old", "new")}
    seconds["find_contours_whole_foreground"] = []
    outputs: dict[str, object] = {}
    for _ in range(repeats):
        for step, (old, new) in STEPS.items():
            for version, fn in (("old", old), ("new", new)):
                s, outputs[f"{step}_{version}"] = timed(lambda fn=fn: fn(labels, image))
                seconds[f"{step}_{version}"].append(s)
        seconds["find_contours_whole_foreground"].append(timed(lambda: whole_foreground_contours(labels))[0])
    old_ids, old_perimeter = outputs["perimeter_old"]
    new_ids, new_perimeter = outputs["perimeter_new"]
    return {
        "shape": list(labels.shape),
        "nuclei": len(outputs["nuclei_polygons_new"]),
        "seconds": {name: min(values) for name, values in seconds.items()},
        "perimeter_ids_equal": bool(np.array_equal(old_ids, new_ids)),
        "perimeter_max_abs_diff": float(np.abs(old_perimeter - new_perimeter).max()) if len(new_ids) else 0.0,
        "table_identical": outputs["nuclei_table_old"] == outputs["nuclei_table_new"],
        "polygons_identical": outputs["nuclei_polygons_old"] == outputs["nuclei_polygons_new"],
    }


def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
    labels = read_label_image(TRAIN / "masks" / f"{stem}.png")
    return labels, read_image(TRAIN / "images" / f"{stem}.tif")


def mosaic(stems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A 1152x1152 tile from the top-left quarters of four masks (ids kept apart): nuclei cut at the seams as
    at a tile's border."""
    half = MOSAIC // 2
    labels = np.zeros((MOSAIC, MOSAIC), np.int32)
    image = np.zeros((MOSAIC, MOSAIC, 3), np.uint8)
    for index, stem in enumerate(stems[:4]):
        part, rgb = load(stem)
        r, c = divmod(index, 2)
        crop = part[:half, :half]
        labels[r * half : (r + 1) * half, c * half : (c + 1) * half] = np.where(crop > 0, crop + 10000 * index, 0)
        image[r * half : (r + 1) * half, c * half : (c + 1) * half] = rgb[:half, :half]
    return labels, image


def versions() -> dict:
    return {
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def totals(maps: list[dict]) -> dict:
    return {name: sum(m["seconds"][name] for m in maps) for name in maps[0]["seconds"]}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Nucleus export speed: whole-map array code vs per-region scikit-image",
        "",
        f"Command: `{r['command']}`  ",
        f"Commit: {r['git_commit']}  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, numpy {m['numpy']}, "
        f"scipy {m['scipy']}, scikit-image {m['scikit-image']}; load average at start {r['loadavg_start']}, at end "
        f"{r['loadavg_end']}; total {r['seconds_total']:.0f} s.",
        "",
        f"Label maps: {r['masks']} MoNuSeg training masks ({r['nuclei_masks']} nuclei, ~1000x1000 px each), and a "
        f"{MOSAIC}x{MOSAIC} mosaic of four of them ({r['mosaic']['nuclei']} nuclei, the size of a predict-wsi "
        f"tile). Seconds: the fastest of {r['repeats']} interleaved runs per map, summed over the masks.",
        "",
        "| step | old s (masks) | new s (masks) | ratio | old s (mosaic) | new s (mosaic) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    old_code = {
        "perimeter": "`regionprops_table(..., 'perimeter')` -> `label_perimeters`",
        "nuclei_table": "`nuclei_table` (per-pixel moments + regionprops perimeter -> row runs + `label_perimeters`)",
        "nuclei_polygons": "`nuclei_polygons` (find_contours per nucleus -> whole map)",
    }
    masks, tile = r["seconds_masks"], r["mosaic"]["seconds"]
    for step, name in old_code.items():
        old, new = f"{step}_old", f"{step}_new"
        lines.append(
            f"| {name} | {masks[old]:.3f} | {masks[new]:.3f} | {masks[old] / masks[new]:.1f}x | "
            f"{tile[old]:.3f} | {tile[new]:.3f} | {tile[old] / tile[new]:.1f}x |"
        )
    old = masks["nuclei_table_old"] + masks["nuclei_polygons_old"]
    new = masks["nuclei_table_new"] + masks["nuclei_polygons_new"]
    tile_old, tile_new = (
        tile["nuclei_table_old"] + tile["nuclei_polygons_old"],
        tile["nuclei_table_new"] + tile["nuclei_polygons_new"],
    )
    lines.append(
        f"| table + polygons | {old:.3f} | {new:.3f} | {old / new:.1f}x | {tile_old:.3f} | {tile_new:.3f} | "
        f"{tile_old / tile_new:.1f}x |"
    )
    c = r["checks"]
    lines += [
        "",
        f"Outputs: polygons identical to the per-nucleus reference on {c['polygons_identical']} of {c['maps']} "
        f"maps; table rows identical on {c['table_identical']} of {c['maps']}; perimeter ids equal on "
        f"{c['perimeter_ids_equal']} of {c['maps']}, largest perimeter difference from regionprops "
        f"{c['perimeter_max_abs_diff']:.1e} px (summation order).",
        "",
        f"For scale: one find_contours call on the whole foreground of each map (all nuclei at once, as any "
        f"batching of find_contours calls would need at least) takes {masks['find_contours_whole_foreground']:.3f} s "
        f"over the masks ({masks['find_contours_whole_foreground'] / masks['nuclei_polygons_new']:.1f}x "
        f"`nuclei_polygons`) and {tile['find_contours_whole_foreground']:.3f} s on the mosaic: find_contours "
        "assembles every boundary cell's segments in Python, whether it is called per nucleus or once.",
        "",
    ]
    return "\n".join(lines)


def write_results(
    result: dict, name: str, start: float, out: Path | None, quick: bool, render: Callable[[dict], str]
) -> None:
    """Close ``result`` (load average at the end, total seconds), write ``<name>.json`` and the Markdown table
    ``render`` makes of it to ``out`` (default benchmarks/results; a temporary folder for a quick run), print it."""
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds_total"] = time.perf_counter() - start
    out = out or (Path(tempfile.mkdtemp(prefix=f"cdcl-{name}-")) if quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", render(result))
    print(render(result))
    print(f"written: {out / f'{name}.json'}, {out / f'{name}.md'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 masks, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per map; the fastest counts")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {RESULTS.relative_to(REPO)}; with --quick a temporary folder)",
    )
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()
    stems = sorted(p.stem for p in (TRAIN / "masks").glob("*.png"))[: 3 if args.quick else None]
    repeats = 1 if args.quick else args.repeats
    result = {
        "command": " ".join(["python", "benchmarks/export_speed.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine(**versions()),
        "loadavg_start": [round(x, 2) for x in load_start],
        "repeats": repeats,
        "masks": len(stems),
    }
    maps = {}
    for stem in stems:
        maps[stem] = bench_map(*load(stem), repeats)
        print(
            f"{stem}: {maps[stem]['nuclei']} nuclei, "
            + ", ".join(f"{k} {v:.3f}" for k, v in maps[stem]["seconds"].items()),
            flush=True,
        )
    result["maps"] = maps
    result["nuclei_masks"] = sum(m["nuclei"] for m in maps.values())
    result["seconds_masks"] = totals(list(maps.values()))
    result["mosaic"] = bench_map(*mosaic(stems), repeats)
    everything = [*maps.values(), result["mosaic"]]
    result["checks"] = {
        "maps": len(everything),
        **{k: sum(m[k] for m in everything) for k in ("polygons_identical", "table_identical", "perimeter_ids_equal")},
        "perimeter_max_abs_diff": max(m["perimeter_max_abs_diff"] for m in everything),
    }
    write_results(result, "export_speed", start, args.out, args.quick, markdown)
    checks = result["checks"]
    return (
        0
        if checks["polygons_identical"] == checks["table_identical"] == checks["perimeter_ids_equal"] == checks["maps"]
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
