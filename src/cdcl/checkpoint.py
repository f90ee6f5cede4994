"""Checkpoints that cannot run code, and the ``Predictor`` a checkpoint alone is enough to build.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, always loaded with
``weights_only=True``: a file whose pickle would construct arbitrary objects (and so could run a command)
is refused. It carries the resolved config, the weights to predict with, the tuned post-processing
thresholds and the training resolution (StarDist's config/thresholds idea, TIAToolbox's bound resolution).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cdcl.errors import CdclError
from cdcl.io import atomic_path

FORMAT = "cdcl-checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a kill mid-write leaves the previous file intact, never a truncated one."""
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


LEAN_KEYS = ("cdcl_version", "config", "step", "complete", "best", "postprocess", "mpp")
"""What a prediction-only checkpoint keeps besides the weights it predicts with."""


def lean_payload(payload: dict[str, Any], half: bool = False) -> dict[str, Any]:
    """Only what prediction needs: the weights ``predict_with`` names (no optimizer, no second model), the config,
    thresholds and resolution. ``half`` stores floating-point weights as float16 (they load back as float32)."""
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
        raise CdclError("not a readable checkpoint: corrupt, truncated or another format (no PyTorch zip archive)", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if "Weights only load failed" not in str(exc) else "it holds objects other than tensors and plain data"
        raise CdclError(f"refusing to load checkpoint: {reason} (it could run code; only cdcl checkpoints are accepted)", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CdclError(f"corrupt or truncated checkpoint ({' '.join(str(exc).split())[:160]})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CdclError(f"not a cdcl checkpoint (expected format '{FORMAT}')", path)
    return payload


@dataclass
class Predictor:
    """Everything inference needs: the model in eval mode and how to run and post-process it."""

    model: torch.nn.Module
    device: torch.device
    postprocess: Any  # cdcl.postprocess.PostprocessParams
    mpp: float | None
    window: int
    overlap: float
    batch_size: int
    amp: bool
    config: Any  # cdcl.config.Config


def model_from_checkpoint(payload: dict[str, Any], path: str | Path, weights: str | None = None) -> torch.nn.Module:
    """Rebuild the architecture from the stored config and load the chosen weights strictly."""
    from cdcl.config import config_from_dict
    from cdcl.models import build_model

    config = config_from_dict(payload["config"])
    config.model.pretrained = False  # the checkpoint holds the weights; never touch the network
    model = build_model(config.model)
    key = weights or payload.get("predict_with", "student")
    try:
        state = payload["weights"][key]
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CdclError(f"checkpoint weights do not match its model '{config.model.encoder}' ({detail})", path) from None
    return model


def load_predictor(path: str | Path, device: str = "auto", batch_size: int | None = None) -> Predictor:
    """Build a ready-to-run ``Predictor`` from a checkpoint file; ``batch_size``: windows per forward pass (None:
    :func:`cdcl.infer.windows_per_batch`)."""
    from cdcl.config import config_from_dict
    from cdcl.infer import windows_per_batch
    from cdcl.postprocess import PostprocessParams
    from cdcl.runtime import resolve_device

    payload = load_checkpoint(path)
    try:
        config = config_from_dict(payload["config"])
        params = PostprocessParams.from_dict(payload.get("postprocess") or {})
    except (KeyError, ValueError, TypeError, CdclError) as exc:
        raise CdclError(f"checkpoint metadata is invalid ({exc})", path) from None
    dev = resolve_device(device)
    model = model_from_checkpoint(payload, path).to(dev).eval()
    return Predictor(model=model, device=dev, postprocess=params, mpp=config.data.mpp, window=config.infer.window,
                     overlap=config.infer.overlap, batch_size=windows_per_batch(batch_size, config.infer.batch_size, dev),
                     amp=config.train.amp and dev.type == "cuda", config=config)
