"""Speed of post-processing (``cdcl.instances.postprocess.instances_from_probability``) against the code it replaced, on
real MoNuSeg images: the distance transform through the ``edt`` package instead of
``scipy.ndimage.distance_transform_edt``, and the final renumbering through one lookup table instead of
``skimage.segmentation.relabel_sequential``. Both versions must give identical instance maps, which is checked.

Probability maps: with ``--checkpoint``, the model's prediction on each training image and on a 1152x1152 mosaic
of four of them (the size of a predict-wsi tile); without, each ground-truth foreground blurred by a Gaussian
(sigma 2 px), which keeps the real nuclei shapes. Old and new run side by side, interleaved, on each map; each
takes the fastest of its repeats. Writes benchmarks/results/postprocess_speed.{json,md}.

    OMP_NUM_THREADS=1 python benchmarks/postprocess_speed.py --checkpoint CKPT   # 30 images + the mosaic
    OMP_NUM_THREADS=1 python benchmarks/postprocess_speed.py --quick             # 3 blurred masks, to a temp folder
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from cdcl.inference.predictor import load_predictor
from cdcl.inference.window import foreground_of, sliding_window_probability
from cdcl.instances import postprocess

from export_speed import MOSAIC, TRAIN, load, mosaic, timed, versions, write_results
from provenance import git_commit, machine


@contextlib.contextmanager
def replaced_code() -> Iterator[None]:
    """``cdcl.instances.postprocess`` with the two replaced steps put back: scipy's distance transform, and small
    instances removed then renumbered by ``relabel_sequential``."""
    saved = postprocess.distance_to_background, postprocess._finish
    postprocess.distance_to_background = ndi.distance_transform_edt
    postprocess._finish = lambda labels, min_size: relabel_sequential(postprocess._remove_small(labels, min_size))[
        0
    ].astype(np.int32)
    try:
        yield
    finally:
        postprocess.distance_to_background, postprocess._finish = saved


def old_instances(prob: np.ndarray, params: postprocess.PostprocessParams) -> np.ndarray:
    with replaced_code():
        return postprocess.instances_from_probability(prob, params)


def bench_map(prob: np.ndarray, params: postprocess.PostprocessParams, repeats: int) -> dict:
    """Fastest of ``repeats`` interleaved runs of old and new, and whether their instance maps are identical."""
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    outputs = {}
    for _ in range(repeats):
        for version, fn in (("old", old_instances), ("new", postprocess.instances_from_probability)):
            s, outputs[version] = timed(lambda fn=fn: fn(prob, params))
            seconds[version].append(s)
    return {
        "shape": list(prob.shape),
        "nuclei": int(outputs["new"].max()),
        "seconds": {version: min(values) for version, values in seconds.items()},
        "identical": bool(
            np.array_equal(outputs["old"], outputs["new"]) and outputs["old"].dtype == outputs["new"].dtype
        ),
    }


def probability_maps(
    stems: list[str], checkpoint: Path | None
) -> tuple[dict[str, np.ndarray], postprocess.PostprocessParams, str]:
    """Per map name, its probability; the post-processing settings to use; where the maps come from."""
    images = {stem: load(stem) for stem in stems}
    images[f"mosaic {MOSAIC}"] = mosaic(stems)
    if checkpoint is None:
        probs = {
            name: ndi.gaussian_filter((labels > 0).astype(np.float32), 2.0) for name, (labels, _) in images.items()
        }
        return probs, postprocess.PostprocessParams(), "ground-truth foregrounds blurred by a Gaussian (sigma 2 px)"
    predictor = load_predictor(checkpoint, device="cpu")
    probs = {
        name: foreground_of(sliding_window_probability(predictor.model, image, **predictor.window_options()))
        for name, (_, image) in images.items()
    }
    return probs, predictor.postprocess, f"predictions of {checkpoint.name}"


def markdown(r: dict) -> str:
    m, images, tile = r["machine"], r["seconds_images"], r["maps"][f"mosaic {MOSAIC}"]["seconds"]
    return "\n".join(
        [
            "# Post-processing speed: `edt` distance transform and lookup-table renumbering vs scipy / scikit-image",
            "",
            f"Command: `{r['command']}`  ",
            f"Commit: {r['git_commit']}  ",
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, numpy {m['numpy']}, "
            f"scipy {m['scipy']}, scikit-image {m['scikit-image']}; load average at start {r['loadavg_start']}, at end "
            f"{r['loadavg_end']}; total {r['seconds_total']:.0f} s.",
            "",
            f"Probability maps: {r['source']}, on {r['images']} MoNuSeg training images (~1000x1000 px, "
            f"{r['nuclei_images']} "
            f"nuclei found) and a {MOSAIC}x{MOSAIC} mosaic of four (a predict-wsi tile, "
            f"{r['maps'][f'mosaic {MOSAIC}']['nuclei']} "
            f"nuclei). Settings: {r['params']}. Seconds of `instances_from_probability`: the fastest of {r['repeats']} "
            "interleaved runs per map, summed over the images.",
            "",
            "| maps | old s | new s | ratio |",
            "|---|---|---|---|",
            f"| {r['images']} images | {images['old']:.3f} | {images['new']:.3f} | "
            f"{images['old'] / images['new']:.2f}x |",
            f"| {MOSAIC}x{MOSAIC} mosaic | {tile['old']:.3f} | {tile['new']:.3f} | {tile['old'] / tile['new']:.2f}x |",
            "",
            f"Instance maps identical to the old code's on {r['identical']} of {len(r['maps'])} maps.",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="predict the probability maps with this model")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 images, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per map; the fastest counts")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; with --quick a temporary folder)",
    )
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()
    stems = sorted(p.stem for p in (TRAIN / "masks").glob("*.png"))[: 3 if args.quick else None]
    repeats = 1 if args.quick else args.repeats
    probs, params, source = probability_maps(stems, args.checkpoint)
    result = {
        "command": " ".join(["python", "benchmarks/postprocess_speed.py", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine(**versions()),
        "loadavg_start": [round(x, 2) for x in load_start],
        "repeats": repeats,
        "images": len(stems),
        "source": source,
        "params": params.to_dict(),
        "maps": {},
    }
    for name, prob in probs.items():
        result["maps"][name] = bench_map(prob, params, repeats)
        print(f"{name}: {result['maps'][name]}", flush=True)
    per_image = [result["maps"][stem] for stem in stems]
    result["seconds_images"] = {v: sum(m["seconds"][v] for m in per_image) for v in ("old", "new")}
    result["nuclei_images"] = sum(m["nuclei"] for m in per_image)
    result["identical"] = sum(m["identical"] for m in result["maps"].values())
    write_results(result, "postprocess_speed", start, args.out, args.quick, markdown)
    return 0 if result["identical"] == len(result["maps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
