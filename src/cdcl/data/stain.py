"""Stain normalisation: every image the model sees is recoloured to the stain of its labeled training images.

A *profile* describes one image's staining. Macenko et al. 2009: by Beer-Lambert, a pixel's optical density
(OD = -log(I / I0)) is a non-negative mix of two stain vectors; they are the extreme directions (1st and 99th
percentile angles) of the tissue pixels' OD in the plane of its two main axes, and the profile holds them with
each stain's 99th-percentile amount. Reinhard et al. 2001: the profile is the tissue pixels' CIELAB means and
standard deviations. Normalising maps an image's own (source) profile onto the reference's.

The reference is fitted once, on the labeled training images pooled, and travels in the checkpoint. A source
profile is estimated per image (per slide in ``predict-wsi``, from a sample of its tissue tiles: estimates from
single small tiles with little tissue are unstable). An image without a profile (too little tissue, or tissue
all of one colour) is left as it is; a reference without one is an error.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.color import lab2rgb, rgb2lab, rgb_from_hed

from cdcl.errors import CdclError
from cdcl.vocab import StainNorm, spoken

TISSUE_OD = 0.15  # a pixel whose OD vector is longer than this is tissue, not (near-)white background
MIN_TISSUE = 1024  # fewest tissue pixels a profile is estimated from
MAX_PIXELS = 1 << 16  # pixels of one image an estimate looks at (an even subsample): bounds its cost
MIN_STAIN_ANGLE = np.deg2rad(3.0)  # Macenko: two stain directions closer than this are one colour
MIN_LAB_STD = 1.0  # Reinhard: a CIELAB channel varying less than this is one colour
PERCENTILE = 99.0

_OD = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)  # uint8 -> OD; 255 is OD 0
_RUIFROK = rgb_from_hed[:2] / np.linalg.norm(rgb_from_hed[:2], axis=1, keepdims=True)  # H and E, unit length


class NoStainProfile(ValueError):
    """The pixels hold no stain to estimate: too little tissue, or tissue all of one colour."""


def _sample(images: Iterable[np.ndarray]) -> np.ndarray:
    """Nx3 uint8 pixels: up to MAX_PIXELS evenly spaced ones of each HxWx3 uint8 image."""
    parts = []
    for image in images:
        flat = image.reshape(-1, 3)
        parts.append(flat[:: max(1, len(flat) // MAX_PIXELS)])
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


def _tissue(pixels: np.ndarray) -> np.ndarray:
    """The tissue pixels of Nx3 uint8 ``pixels``; NoStainProfile when there are too few."""
    tissue = pixels[np.linalg.norm(_OD[pixels], axis=1) > TISSUE_OD]
    if len(tissue) < MIN_TISSUE:
        raise NoStainProfile(f"too little tissue ({len(tissue)} stained pixels, need {MIN_TISSUE}): blank or not H&E")
    return tissue


def _macenko_profile(tissue: np.ndarray, like: np.ndarray) -> dict[str, np.ndarray]:
    """``like``: the (haematoxylin, eosin) directions the two stains found are matched to (the pairing nearer in
    direction)."""
    od = _OD[tissue].astype(np.float64)
    plane = np.linalg.eigh(np.cov(od.T))[1][:, [2, 1]]  # the two main axes (eigh sorts eigenvalues ascending)
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0  # first axis into the positive octant, where OD lies
    along = od @ plane
    low, high = np.percentile(np.arctan2(along[:, 1], along[:, 0]), [100 - PERCENTILE, PERCENTILE])
    if high - low < MIN_STAIN_ANGLE:
        raise NoStainProfile("tissue of a single colour: not two stains (blank, grey or not H&E)")
    stains = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (low, high)])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    cosines = stains @ like.T  # [found, like]
    if cosines[0, 1] + cosines[1, 0] > cosines[0, 0] + cosines[1, 1]:
        stains = stains[::-1]
    amounts = np.percentile(od @ np.linalg.pinv(stains), PERCENTILE, axis=0)
    if not np.all(amounts > 0):
        raise NoStainProfile("one of the two stains is absent: not H&E")
    return {"stains": stains, "amounts": amounts}


def _macenko_apply(image: np.ndarray, source: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    """Each pixel's stain amounts (negative ones, of colours outside the two stains' cone, as none), rescaled to the
    reference's percentiles and recombined with its stain vectors."""
    unmix = (np.linalg.pinv(source["stains"]) * (reference["amounts"] / source["amounts"])).astype(np.float32)
    amounts = np.maximum(_OD[image].reshape(-1, 3) @ unmix, 0)
    rgb = 256.0 * np.exp(-(amounts @ reference["stains"].astype(np.float32))) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(image.shape)


def _reinhard_profile(tissue: np.ndarray, like: np.ndarray | None = None) -> dict[str, np.ndarray]:
    lab = rgb2lab(tissue[None]).reshape(-1, 3)
    mean, std = lab.mean(axis=0), lab.std(axis=0)
    if std.min() < MIN_LAB_STD:
        raise NoStainProfile("tissue of a single colour: no colour variation (blank, grey or not H&E)")
    return {"mean": mean, "std": std}


def _reinhard_apply(image: np.ndarray, source: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> np.ndarray:
    lab = (rgb2lab(image) - source["mean"]) * (reference["std"] / source["std"]) + reference["mean"]
    with warnings.catch_warnings():  # colours moved outside sRGB are clipped, as intended: no warning per image
        warnings.filterwarnings("ignore", "Conversion from CIE-LAB", UserWarning)
        rgb = lab2rgb(lab)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


_METHODS = {"macenko": (_macenko_profile, _macenko_apply), "reinhard": (_reinhard_profile, _reinhard_apply)}
_KEYS = {"macenko": {"stains": (2, 3), "amounts": (2,)}, "reinhard": {"mean": (3,), "std": (3,)}}


def estimate_profile(
    method: StainNorm, images: Iterable[np.ndarray], reference: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The stain profile of HxWx3 uint8 ``images`` pooled; NoStainProfile (saying why) when they hold none.
    Macenko's two stains are told apart by direction, paired with the ``reference``'s haematoxylin and eosin
    (without one, with the Ruifrok-Johnston vectors)."""
    like = _RUIFROK if reference is None else reference.get("stains")
    return _METHODS[method][0](_tissue(_sample(images)), like)


@dataclass(frozen=True)
class StainNormalizer:
    """Recolours HxWx3 uint8 images to the ``reference`` profile. ``source``: a fixed profile of the images to come
    (a slide's); None estimates each image's own, and leaves an image without one as it is."""

    method: StainNorm
    reference: dict[str, np.ndarray]
    source: dict[str, np.ndarray] | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        source = self.source
        if source is None:
            try:
                source = estimate_profile(self.method, [image], self.reference)
            except NoStainProfile:
                return image
        return _METHODS[self.method][1](image, source, self.reference)

    def with_source(self, images: Iterable[np.ndarray]) -> StainNormalizer | None:
        """This normaliser with the source profile of ``images`` pooled fixed; None when they hold none (so
        the images are best left as they are)."""
        try:
            return dataclasses.replace(self, source=estimate_profile(self.method, images, self.reference))
        except NoStainProfile:
            return None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and strings: what a checkpoint stores (``cdcl.checkpoint`` loads no other objects)."""
        return {"method": self.method, "reference": {k: v.tolist() for k, v in self.reference.items()}}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> StainNormalizer:
        """Inverse of :meth:`to_dict`; ValueError when ``stored`` is not one."""
        method = stored.get("method") if isinstance(stored, dict) else None
        if method not in _METHODS:
            raise ValueError(f"stain method must be {spoken(tuple(_METHODS), quote=chr(39))}, got {method!r}")
        values = stored.get("reference")
        shapes = _KEYS[method]
        if not isinstance(values, dict) or set(values) != set(shapes):
            raise ValueError(f"{method} stain reference must hold {', '.join(shapes)}")
        reference = {k: np.asarray(values[k], dtype=np.float64) for k in shapes}
        if any(reference[k].shape != shape or not np.all(np.isfinite(reference[k])) for k, shape in shapes.items()):
            raise ValueError(f"{method} stain reference has wrong shapes or non-finite values")
        return cls(method, reference)


def fit_reference(method: StainNorm, images: Iterable[np.ndarray], where: str | Path) -> StainNormalizer:
    """The normaliser to the stain of ``images`` pooled (the labeled training images, listed in ``where``); a
    one-line CdclError naming ``where`` when they hold no stain profile."""
    try:
        return StainNormalizer(method, estimate_profile(method, images))
    except NoStainProfile as exc:
        raise CdclError(f"data.stain_norm={method}: no stain reference in the labeled images: {exc}", where) from None
