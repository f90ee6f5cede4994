"""Checkpoint files that cannot run code: save, load, and the lean prediction-only payload.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, always loaded with
``weights_only=True``: a file whose pickle would construct arbitrary objects (and so could run a command)
is refused. It carries the resolved config, the weights to predict with, the tuned post-processing
thresholds, the training resolution, the training nuclei's size and the stain reference (StarDist's
config/thresholds idea, TIAToolbox's bound resolution).
This module is file I/O only; the model a checkpoint rebuilds is ``cdcl.inference.predictor``'s business.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cdcl.errors import CdclError, squashed
from cdcl.io import atomic_path

FORMAT = "cdcl-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a kill mid-write leaves the previous file intact, never a truncated one."""
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


LEAN_KEYS = (
    "cdcl_version",
    "config",
    "step",
    "complete",
    "best",
    "postprocess",
    "mpp",
    "nucleus_diameter",
    "predicted_nucleus_diameter",
    "stain",
)
"""What a prediction-only checkpoint keeps besides the weights it predicts with."""


def lean_payload(payload: dict[str, Any], half: bool = False) -> dict[str, Any]:
    """Only what prediction needs: the weights ``predict_with`` names (no optimizer, no second model), the config,
    thresholds, resolution, nucleus size and stain reference. ``half`` stores floating-point weights as float16
    (they load back as float32)."""
    key = payload.get("predict_with", "student")
    try:
        state = payload["weights"][key]
    except (KeyError, TypeError):
        raise CdclError(f"checkpoint has no '{key}' weights to predict with") from None
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    lean = {k: payload[k] for k in LEAN_KEYS if k in payload}
    return {**lean, "predict_with": key, "weights": {key: state}}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely; every failure is a one-line CdclError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CdclError("checkpoint not found", path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise CdclError(
            "not a readable checkpoint: corrupt, truncated or another format (no PyTorch zip archive)", path
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = (
            str(exc).splitlines()[0]
            if "Weights only load failed" not in str(exc)
            else "it holds objects other than tensors and plain data"
        )
        raise CdclError(
            f"refusing to load checkpoint: {reason} (it could run code; only cdcl checkpoints are accepted)", path
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CdclError(f"corrupt or truncated checkpoint ({squashed(exc, 160)})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CdclError(f"not a cdcl checkpoint (expected format '{FORMAT}')", path)
    return payload
