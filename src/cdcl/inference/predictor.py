"""The ``Predictor``: a model rebuilt from a checkpoint alone, with how to run and post-process it.

A checkpoint (``cdcl.checkpoint``) carries the config, weights, tuned thresholds, training resolution and stain
reference; this rebuilds the architecture from the config, loads the weights strictly and binds the inference
settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdcl.checkpoint import load_checkpoint
from cdcl.config import Config, config_from_dict
from cdcl.data.stain import StainNormalizer
from cdcl.errors import CdclError, squashed
from cdcl.inference.window import MULTIPLE, sliding_window_probability, windows_per_batch
from cdcl.instances.postprocess import PostprocessParams, instances_from_maps
from cdcl.models import build_model
from cdcl.runtime import resolve_device
from cdcl.vocab import TTA_MODES, spoken


@dataclass
class Predictor:
    """Everything inference needs: the model in eval mode and how to run and post-process it."""

    model: torch.nn.Module
    device: torch.device
    postprocess: PostprocessParams
    mpp: float | None
    window: int
    overlap: float
    batch_size: int
    amp: bool
    config: Config
    stain: StainNormalizer | None = None  # the training images' stain normalisation (data.stain_norm), or None
    tta: str = "none"  # cdcl.vocab.TTA_MODES
    nucleus_diameter: float | None = None  # training nuclei's size, px at ``mpp`` (--mpp auto; see load_predictor)

    def window_options(self) -> dict[str, Any]:
        """How the model runs over an image: the keyword options of ``cdcl.inference.window.start_probability``."""
        return {
            "window": self.window,
            "overlap": self.overlap,
            "batch_size": self.batch_size,
            "device": self.device,
            "amp": self.amp,
            "stain": self.stain,
            "tta": self.tta,
        }


def model_from_checkpoint(payload: dict[str, Any], path: str | Path, weights: str | None = None) -> torch.nn.Module:
    """Rebuild the architecture from the stored config and load the chosen weights strictly."""
    config = config_from_dict(payload["config"])
    config.model.pretrained = False  # the checkpoint holds the weights; never touch the network
    try:
        model = build_model(config.model)
    except ValueError as exc:  # a model setting outside its vocabulary (output stride, representation)
        raise CdclError(f"checkpoint model settings are invalid ({squashed(exc, 200)})", path) from None
    key = weights or payload.get("predict_with", "student")
    try:
        state = payload["weights"][key]
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        detail = squashed(exc, 200)
        raise CdclError(
            f"checkpoint weights do not match its model '{config.model.encoder}' ({detail})", path
        ) from None
    return model


def stain_from_checkpoint(payload: dict[str, Any], config: Config, path: str | Path) -> StainNormalizer | None:
    """The stain normalisation the model was trained with (None when ``data.stain_norm`` was off)."""
    if config.data.stain_norm == "none":
        return None
    if payload.get("stain") is None:
        raise CdclError(
            f"checkpoint was trained with data.stain_norm={config.data.stain_norm} but stores no stain reference", path
        )
    try:
        return StainNormalizer.from_dict(payload["stain"])
    except ValueError as exc:
        raise CdclError(f"checkpoint stain reference is invalid ({exc})", path) from None


def load_predictor(
    path: str | Path, device: str = "auto", batch_size: int | None = None, tta: str | None = None
) -> Predictor:
    """Build a ready-to-run ``Predictor`` from a checkpoint file; ``batch_size``: windows per forward pass (None:
    :func:`cdcl.inference.window.windows_per_batch`); ``tta``: a :data:`cdcl.vocab.TTA_MODES` (None: the
    checkpoint's ``infer.tta``). The nucleus size ``--mpp auto`` aims at is the model's own, measured on its val
    predictions at the end of training, when stored (its bias then cancels), else the labeled masks'."""
    payload = load_checkpoint(path)
    try:
        config = config_from_dict(payload["config"])
        params = PostprocessParams.from_dict(payload.get("postprocess") or {})
    except (KeyError, ValueError, TypeError, CdclError) as exc:
        raise CdclError(f"checkpoint metadata is invalid ({exc})", path) from None
    window = config.infer.window
    if window <= 0 or window % MULTIPLE:  # a stored config is rebuilt unchecked
        raise CdclError(
            f"the checkpoint's window (infer.window {window}) does not fit the model: it must be a positive "
            f"multiple of {MULTIPLE} in every orientation (plain or --tta)",
            path,
        )
    tta = config.infer.tta if tta is None else tta
    if tta not in TTA_MODES:
        raise CdclError(f"unknown test-time augmentation '{tta}' (infer.tta): choose {spoken(TTA_MODES)}", path)
    dev = resolve_device(device)
    model = model_from_checkpoint(payload, path).to(dev).eval()
    return Predictor(
        model=model,
        device=dev,
        postprocess=params,
        mpp=config.data.mpp,
        window=window,
        overlap=config.infer.overlap,
        batch_size=windows_per_batch(batch_size, config.infer.batch_size, dev),
        amp=config.train.amp and dev.type == "cuda",
        config=config,
        stain=stain_from_checkpoint(payload, config, path),
        tta=tta,
        nucleus_diameter=payload.get("predicted_nucleus_diameter") or payload.get("nucleus_diameter"),
    )


def predict_instances(predictor: Predictor, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction maps, instance labels) of one image with the predictor's window and thresholds."""
    prob = sliding_window_probability(predictor.model, image, **predictor.window_options())
    return prob, instances_from_maps(prob, predictor.postprocess)
