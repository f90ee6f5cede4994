"""``cdcl data check``: read every item of a dataset once and report counts, sizes, nuclei and all problems.

Unlike ``load_dataset``, which stops at the first problem, this lists every one (layout problems such as
stray files or orphan masks, then files that fail to decode or do not match their image), so a dataset can be
fixed in one pass.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cdcl.data.readers import scan_dataset
from cdcl.errors import CdclError

__all__ = ["check_dataset", "format_report"]


def check_dataset(root: str | Path, format: str) -> dict[str, Any]:
    """Counts, image sizes, nuclei per labeled image and the list of problems ("path: problem") of a dataset."""
    dataset, layout_problems = scan_dataset(root, format)
    problems = [str(err) for err in layout_problems]
    sizes: Counter[tuple[int, int]] = Counter()
    nuclei: list[int] = []
    for item in tqdm(dataset, desc="checking", unit="image", disable=None):
        try:
            sizes[item.image.shape[:2]] += 1
            if item.has_mask:
                nuclei.append(int(np.count_nonzero(np.unique(item.instances))))
        except CdclError as err:
            problems.append(str(err))
    n_labeled = sum(item.has_mask for item in dataset)
    return {
        "root": str(root),
        "format": format,
        "images": len(dataset),
        "labeled": n_labeled,
        "unlabeled": len(dataset) - n_labeled,
        "image_sizes": _size_summary(sizes),
        "nuclei_per_image": _nuclei_summary(nuclei),
        "problems": problems,
    }


def _size_summary(sizes: Counter[tuple[int, int]]) -> dict[str, Any] | None:
    """Smallest and largest "HxW" by pixel count, and how many images have each distinct size."""
    if not sizes:
        return None
    by_area = sorted(sizes, key=lambda size: (size[0] * size[1], size))
    text = {size: f"{size[0]}x{size[1]}" for size in by_area}
    return {"min": text[by_area[0]], "max": text[by_area[-1]], "unique": {text[s]: sizes[s] for s in sorted(sizes)}}


def _nuclei_summary(nuclei: list[int]) -> dict[str, Any] | None:
    if not nuclei:
        return None
    return {
        "images": len(nuclei),
        "min": min(nuclei),
        "median": float(np.median(nuclei)),
        "max": max(nuclei),
        "total": sum(nuclei),
    }


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines: what was found, then each problem."""
    lines = [
        f"dataset  {report['root']} ({report['format']})",
        f"images   {report['images']} ({report['labeled']} labeled, {report['unlabeled']} unlabeled)",
    ]
    sizes = report["image_sizes"]
    if sizes:
        lines.append(f"sizes    {sizes['min']} to {sizes['max']}, {len(sizes['unique'])} distinct (height x width)")
    nuclei = report["nuclei_per_image"]
    if nuclei:
        lines.append(
            f"nuclei   per labeled image min {nuclei['min']}, median {nuclei['median']:g}, max {nuclei['max']}; "
            f"total {nuclei['total']} in {nuclei['images']} images"
        )
    if report["problems"]:
        lines.append("problems:")
        lines += [f"  {problem}" for problem in report["problems"]]
    return "\n".join(lines)
