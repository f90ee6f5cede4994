"""Evaluation of a predictor on labeled items: whole-image prediction, instances, every metric, per-image CSV,
overlays (``cdcl evaluate`` and ``cdcl demo``). Scores are always taken at the images' own resolution: with
``mpp`` the prediction is made at the model's and scaled back first (``cdcl.inference.resolution``).

Outputs are built in a temporary folder beside ``--out`` and moved into place only when complete, so a
failure (bad checkpoint, image without mask, size mismatch) leaves nothing half-written.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor
from cdcl.inference.resolution import log_estimates, predict_at
from cdcl.io import ensure_writable_dir, save_png
from cdcl.metrics import SCORE_KEYS, aggregate, evaluate_pair
from cdcl.viz import GT_COLOUR, PRED_COLOUR, overlay_contours

SUMMARY_KEYS = SCORE_KEYS  # the scores a table shows: every one the metrics compute


def evaluate_items(
    predictor: Predictor,
    items: list,
    out_dir: str | Path,
    *,
    overlays: bool = True,
    progress: bool | None = None,
    mpp: float | str | None = None,
) -> dict:
    """Evaluate ``items`` (each with ``.image`` and ``.instances``); write metrics.json, per_image.csv, overlays.
    ``mpp``: the images' microns per pixel or ``auto`` (:func:`cdcl.inference.resolution.predict_at`)."""
    out_dir = ensure_writable_dir(out_dir)
    if not items:
        raise CdclError("nothing to evaluate: the item list is empty", out_dir)
    stage = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=out_dir))
    try:
        rows, scales = [], []
        for item in tqdm(items, desc="evaluate", unit="image", disable=None if progress is None else not progress):
            gt = item.instances
            if gt is None:
                raise CdclError(f"item '{item.name}' has no mask: cannot evaluate it", item.image_path)
            image = item.image
            if gt.shape != image.shape[:2]:
                raise CdclError(f"mask size {gt.shape} differs from image size {image.shape[:2]}", item.image_path)
            pred, scale = predict_at(predictor, image, mpp, item.name)
            scales.append(scale)
            scores = evaluate_pair(gt, pred)
            rows.append({"name": item.name, **scores})
            if overlays:
                save_png(
                    stage / "overlays" / f"{_safe(item.name)}.png",
                    overlay_contours(image, [(gt, GT_COLOUR), (pred, PRED_COLOUR)]),
                )
        log_estimates(predictor, mpp, scales)
        result = aggregate([{k: v for k, v in r.items() if k != "name"} for r in rows])
        result["postprocess"] = predictor.postprocess.to_dict()
        result["legend"] = {"ground_truth": "green", "prediction": "yellow"}
        (stage / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (stage / "per_image.csv").write_text(_csv(rows))
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                target = out_dir / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.replace(target)
        return result
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _safe(name: str) -> str:
    """An item name (may hold '/' or a tile suffix) as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_table(results: dict[str, dict], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """Markdown table of per-image mean metrics, one row per named result."""
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    return head + "".join(
        f"| {name} | " + " | ".join(f"{r['mean'][k]:.3f}" for k in keys) + " |\n" for name, r in results.items()
    )
