"""Predicting at the model's resolution: an image is rescaled to the model's microns per pixel, predicted, and its
instance map scaled back (nearest neighbour) to the image's own size, so outputs and scores stay in the
image's pixels.

The image's resolution is given (``--mpp X``: microns per pixel) or estimated (``--mpp auto``): a first pass at
the image's own pixels measures the median predicted nucleus diameter (``cdcl.instances.sizes``); the ratio of
the training set's median (stored in the checkpoint at training start) to it is the scale to apply; a second
pass predicts at that scale. A model sees nuclei of the size it learned; on MoNuSeg rescaled 0.5x-2x the
estimate's error is measured by ``benchmarks/resolution.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import relabel_sequential

from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor, predict_instances
from cdcl.instances.sizes import median_diameter
from cdcl.ranges import MAX_UPSAMPLING, RESIDUAL_TOLERANCE

log = logging.getLogger(__name__)

AUTO = "auto"
"""``--mpp auto``: estimate each image's scale from its predicted nucleus size."""


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


def estimate_scale(labels: np.ndarray, trained_diameter: float) -> float | None:
    """The factor that gives the nuclei of ``labels`` the training median diameter (``trained_diameter`` px);
    None when too few nuclei are measured."""
    diameter = median_diameter([labels])
    return None if diameter is None else trained_diameter / diameter


def predict_at(predictor: Predictor, image: np.ndarray, mpp: float | str | None, name: str = "") -> np.ndarray:
    """Instance labels of ``image`` (at its size), predicted at the model's resolution: ``mpp`` is the image's
    microns per pixel, ``auto`` (estimated, see the module) or None (the image's own pixels). Call
    :func:`check_request` first."""
    if mpp is None:
        return predict_instances(predictor, image)[1]
    if mpp != AUTO:
        return instances_at_scale(predictor, image, scale_for(float(mpp), predictor.mpp))
    labels = predict_instances(predictor, image)[1]
    scale = estimate_scale(labels, predictor.nucleus_diameter)
    if scale is None:
        log.warning("%s: too few nuclei to estimate the resolution; predicted at its own pixels", name or "image")
        return labels
    scale = float(np.clip(scale, 1 / MAX_UPSAMPLING, MAX_UPSAMPLING))
    estimate = "" if predictor.mpp is None else f" (~{predictor.mpp * scale:.3g} microns per pixel)"
    log.info("%s: nuclei %.2fx the training size%s", name or "image", 1 / scale, estimate)
    if abs(scale - 1) <= RESIDUAL_TOLERANCE:
        return labels
    return instances_at_scale(predictor, image, scale)
