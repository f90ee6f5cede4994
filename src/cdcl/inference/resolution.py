"""Predicting at the model's resolution: an image is rescaled to the model's microns per pixel, predicted, and its
instance map scaled back (nearest neighbour) to the image's own size, so outputs and scores stay in the
image's pixels.

The image's resolution is given (``--mpp X``: microns per pixel) or estimated (``--mpp auto``): a first pass at
the image's own pixels measures the predicted nucleus diameter (``cdcl.instances.sizes``) and compares it with
the training nuclei's (stored in the checkpoint at training start); the image is rescaled by their ratio and
predicted again. A model run at the wrong scale pulls the nuclei it finds towards the size it learned, so one
ratio under-corrects (on MoNuSeg 2x, nuclei measured 1.5x): each further pass measures again, and from the
last two passes a secant step in log scale (how much the measured size followed the rescaling) aims at the
scale where the nuclei have the training size; the passes stop when a step is within ``RESIDUAL_TOLERANCE``
or after ``AUTO_PASSES``. The estimate's error on MoNuSeg rescaled 0.5x-2x is measured by
``benchmarks/resolution.py``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import relabel_sequential

from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor, predict_instances
from cdcl.instances.sizes import nucleus_diameter
from cdcl.ranges import MAX_UPSAMPLING, RESIDUAL_TOLERANCE

log = logging.getLogger(__name__)

AUTO = "auto"
"""``--mpp auto``: estimate each image's scale from its predicted nucleus size."""
AUTO_PASSES = 4  # the most predictions ``--mpp auto`` makes of one image
RESPONSE = (0.5, 1.0)  # the secant's slope (log measured size per log rescale) is kept within this range


def check_request(predictor: Predictor, mpp: float | str | None, checkpoint: str | Path | None = None) -> None:
    """Refuse, before anything is predicted or written, a resolution the checkpoint cannot serve: ``auto``
    without a stored training nucleus size, a number without a stored training resolution (``data.mpp``), or an
    image too coarse for the model."""
    if mpp is None:
        return
    if mpp == AUTO:
        if predictor.nucleus_diameter is None:
            raise CdclError(
                "--mpp auto needs the training nucleus size, which this checkpoint does not store (trained by an "
                "older cdcl): pass --mpp with the images' microns per pixel",
                checkpoint,
            )
        return
    if predictor.mpp is None:
        raise CdclError(
            "--mpp needs the model's training resolution, which this checkpoint does not store (set data.mpp "
            "when training); without --mpp the images are predicted at their own pixels",
            checkpoint,
        )
    scale_for(float(mpp), predictor.mpp)


def scale_for(image_mpp: float, model_mpp: float) -> float:
    """The factor that brings an image of ``image_mpp`` to the model's ``model_mpp`` (> 1: enlarge); 1.0 within
    ``RESIDUAL_TOLERANCE``. More than ``MAX_UPSAMPLING`` is a user error, as for slides."""
    scale = image_mpp / model_mpp
    if scale > MAX_UPSAMPLING:
        raise CdclError(
            f"--mpp {image_mpp:g} is more than {MAX_UPSAMPLING}x coarser than the model's {model_mpp:g} microns "
            "per pixel: too low a magnification for it"
        )
    return 1.0 if abs(scale - 1) <= RESIDUAL_TOLERANCE else scale


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An HxWx3 uint8 image resized by ``scale`` (bilinear, antialiased when shrinking; at least 1 px a side)."""
    height, width = (max(1, round(n * scale)) for n in image.shape[:2])
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An instance map resized to ``shape`` by nearest neighbour (pixel centres), ids made sequential again
    (a nucleus shrunk below one pixel disappears)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.intp), labels.shape[1] - 1)
    return relabel_sequential(labels[np.ix_(rows, cols)])[0].astype(np.int32, copy=False)


def instances_at_scale(predictor: Predictor, image: np.ndarray, scale: float) -> np.ndarray:
    """Instance labels of ``image`` predicted after resizing it by ``scale``, at the image's own size."""
    if scale == 1.0:
        return predict_instances(predictor, image)[1]
    _, labels = predict_instances(predictor, rescale_image(image, scale))
    return resize_labels(labels, image.shape[:2])


def auto_instances(predictor: Predictor, image: np.ndarray, name: str = "") -> tuple[np.ndarray, float]:
    """``--mpp auto`` (see the module): the instance labels of ``image`` at its size, and the scale they were
    predicted at (1.0: the image's own pixels)."""
    scale, labels = 1.0, predict_instances(predictor, image)[1]
    steps: list[tuple[float, float]] = []  # (log scale, log of measured over trained size)
    for _ in range(AUTO_PASSES - 1):
        diameter = nucleus_diameter([labels])
        if diameter is None:
            log.warning("%s: too few nuclei to estimate the resolution at scale %.3g; kept", name or "image", scale)
            break
        steps.append((math.log(scale), math.log(diameter * scale / predictor.nucleus_diameter)))
        target = float(np.clip(math.exp(next_log_scale(steps)), 1 / MAX_UPSAMPLING, MAX_UPSAMPLING))
        if abs(target / scale - 1) <= RESIDUAL_TOLERANCE:
            break
        scale, labels = target, instances_at_scale(predictor, image, target)
    estimate = "" if predictor.mpp is None else f" (~{predictor.mpp * scale:.3g} microns per pixel)"
    log.info("%s: predicted at %.3gx%s", name or "image", scale, estimate)
    return labels, scale


def next_log_scale(steps: list[tuple[float, float]]) -> float:
    """Where the measured size should meet the trained one: the last log scale less its log size ratio over the
    response slope, taken from the last two steps (1 with one step; kept within ``RESPONSE``)."""
    log_scale, log_ratio = steps[-1]
    slope = 1.0
    if len(steps) > 1 and steps[-1][0] != steps[-2][0]:
        slope = float(np.clip((log_ratio - steps[-2][1]) / (log_scale - steps[-2][0]), *RESPONSE))
    return log_scale - log_ratio / slope


def predict_at(
    predictor: Predictor, image: np.ndarray, mpp: float | str | None, name: str = ""
) -> tuple[np.ndarray, float]:
    """Instance labels of ``image`` (at its size) predicted at the model's resolution, and the scale used:
    ``mpp`` is the image's microns per pixel, ``auto`` (estimated, see the module) or None (the image's own
    pixels). Call :func:`check_request` first."""
    if mpp is None:
        return predict_instances(predictor, image)[1], 1.0
    if mpp == AUTO:
        return auto_instances(predictor, image, name)
    scale = scale_for(float(mpp), predictor.mpp)
    return instances_at_scale(predictor, image, scale), scale


def log_estimates(predictor: Predictor, mpp: float | str | None, scales: list[float]) -> None:
    """After ``--mpp auto`` on several images: their median estimate, the one ``--mpp`` to give images of one
    scanner (a single tile holds too few nuclei for a precise estimate; ``benchmarks/resolution.py``)."""
    if mpp != AUTO or len(scales) < 2:
        return
    scale = float(np.median(scales))
    estimate = f"{predictor.mpp * scale:.3g} microns per pixel" if predictor.mpp else f"scale {scale:.3g}"
    log.info(
        "--mpp auto: median estimate over %d images: %s (pass it as --mpp for images of one scanner)",
        len(scales),
        estimate,
    )
