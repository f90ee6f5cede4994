"""Training views: a labeled view, and weak/strong pairs of unlabeled images that share one geometry.

The teacher sees the weak view and the student the strong one; their predictions are compared pixel by pixel,
so both views are cut from one geometric transform (crop, optional scale, flips, 90-degree rotations) and only
the strong one gets photometric changes on top. Everything is numpy (float32 CHW in [0, 1] out) and every
random draw comes from the ``rng`` argument, so one seeded generator per sample reproduces a view exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, rgb2gray, rgb2yiq, rgb_from_hed, yiq2rgb
from skimage.segmentation import relabel_sequential

from cdcl.vocab import STAIN_AUGMENTS, StainAugment, spoken


@dataclass
class AugmentConfig:
    """Augmentation settings; the photometric strengths are those of the strong view."""

    crop_size: int = 256  # output side; smaller images are mirror-padded first
    scale: tuple[float, float] | None = None  # random rescale range before cropping, e.g. (0.8, 1.25); None = off
    flip: bool = True  # random horizontal/vertical flips
    rotate90: bool = True  # random k * 90 degree rotation
    labeled_photometric: bool = True  # photometric jitter on the labeled view too, scaled by labeled_strength
    labeled_strength: float = 0.5  # labeled-view jitter = strong-view magnitudes and probabilities times this
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05  # hue rotation as a fraction of a full turn
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_std: float = 0.03  # additive Gaussian noise, in [0, 1] intensity units
    grey_prob: float = 0.2
    hed_sigma: float = 0.05  # H&E stain jitter: per-stain scale 1 +- sigma and shift +- sigma in optical density
    # The labeled view's extra stain step (augment.stain="hed"; cdcl.vocab.STAIN_AUGMENTS): the range another lab's
    # slides span, drawn after the jitter above. "none" leaves the views exactly as without these keys.
    stain: StainAugment = "none"
    stain_scale: float = 0.2  # each stain's optical density times a factor in [1 - s, 1 + s]
    stain_shift: float = 0.05  # ... plus a shift in [-b, b] optical-density units
    stain_brightness: float = 0.1  # intensity times a factor in [1 - b, 1 + b]
    stain_gamma: float = 0.2  # intensity to the power exp(u), u in [-g, g]
    stain_blur_prob: float = 0.2  # Gaussian blur (sigma in blur_sigma), as a scanner out of focus

    def __post_init__(self) -> None:
        if self.scale is not None:
            self.scale = _float_pair("scale", self.scale)
            if not 0 < self.scale[0] <= self.scale[1]:
                raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        self.blur_sigma = _float_pair("blur_sigma", self.blur_sigma)
        if not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 <= low <= high, got {self.blur_sigma}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        if self.stain not in STAIN_AUGMENTS:
            raise ValueError(f"stain must be {spoken(STAIN_AUGMENTS, quote=chr(39))}, got '{self.stain}'")
        for name, low, high in [
            ("labeled_strength", 0, 1),
            ("brightness", 0, 1),
            ("contrast", 0, 1),
            ("saturation", 0, 1),
            ("hue", 0, 0.5),
            ("blur_prob", 0, 1),
            ("grey_prob", 0, 1),
            ("hed_sigma", 0, 1),
            ("noise_std", 0, 1),
            ("stain_scale", 0, 1),
            ("stain_shift", 0, 1),
            ("stain_brightness", 0, 1),
            ("stain_gamma", 0, 1),
            ("stain_blur_prob", 0, 1),
        ]:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _float_pair(name: str, value: object) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}") from None
    return low, high


@dataclass(frozen=True)
class Geometry:
    """One draw of the spatial transform shared by the views of an image.

    Output pixel (i, j), before the dihedral step, samples the source at (rows[i], cols[j]); coordinates outside
    the image are mirrored back in (half-sample symmetric). Then the output is flipped left-right if ``hflip``
    and rotated by ``k`` quarter turns (together: all 8 symmetries of the square).
    """

    rows: np.ndarray
    cols: np.ndarray
    hflip: bool
    k: int

    @property
    def integer(self) -> bool:
        """True when no resampling is needed (scale 1): the image is copied pixel for pixel."""
        return bool(np.all(self.rows == np.round(self.rows)) and np.all(self.cols == np.round(self.cols)))

    def image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC array -> SxSxC float32 (same value scale as the input); bilinear only when scaled."""
        if self.integer:
            rows, cols = _mirror(self.rows, image.shape[0])[0], _mirror(self.cols, image.shape[1])[0]
            return self._dihedral(image.take(rows, axis=0).take(cols, axis=1).astype(np.float32))
        grid = np.meshgrid(self.rows, self.cols, indexing="ij")
        channels = [
            ndi.map_coordinates(image[..., c], grid, order=1, mode="reflect", output=np.float32)
            for c in range(image.shape[2])
        ]
        return self._dihedral(np.stack(channels, axis=-1))

    def labels(self, instances: np.ndarray) -> np.ndarray:
        """HxW instance map -> SxS int32, nearest neighbour, relabelled 1..K.

        Mirrored padding shows mirror copies of nuclei in the image; each copy is labelled as its own instance
        (a zero pad would teach the model that those nuclei are background).
        """
        r_idx, r_band = _mirror(np.floor(self.rows + 0.5), instances.shape[0])
        c_idx, c_band = _mirror(np.floor(self.cols + 0.5), instances.shape[1])
        ids = instances.take(r_idx, axis=0).take(c_idx, axis=1).astype(np.int64)
        if r_band.any() or c_band.any():
            r_code, c_code = r_band - r_band.min(), c_band - c_band.min()
            copy = r_code[:, None] * (c_code.max() + 1) + c_code[None, :]
            ids = np.where(ids > 0, ids * (copy.max() + 1) + copy, 0)
        return self._dihedral(relabel_sequential(ids)[0].astype(np.int32))

    def _dihedral(self, array: np.ndarray) -> np.ndarray:
        if self.hflip:
            array = array[:, ::-1]
        return np.ascontiguousarray(np.rot90(array, self.k))


def _mirror(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer coordinates -> (index inside [0, size), which mirror copy: 0 = the image itself)."""
    n = coords.astype(np.int64)
    m = n % (2 * size)
    return np.where(m < size, m, 2 * size - 1 - m), n // size


def sample_geometry(shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig) -> Geometry:
    """Draw crop position, scale and symmetry for an image of ``shape`` (H, W)."""
    s = float(rng.uniform(*cfg.scale)) if cfg.scale is not None else 1.0
    size = cfg.crop_size
    starts = [_crop_start(n, size, s, rng) for n in shape]
    offsets = (np.arange(size) + 0.5) / s - 0.5  # pixel centres of the output, in source pixels
    if cfg.rotate90:
        k = int(rng.integers(4))
    else:
        k = 2 * int(rng.integers(2)) if cfg.flip else 0  # a half turn after a left-right flip = up-down flip
    hflip = bool(rng.integers(2)) if cfg.flip else False
    return Geometry(rows=starts[0] + offsets, cols=starts[1] + offsets, hflip=hflip, k=k)


def _crop_start(n: int, size: int, s: float, rng: np.random.Generator) -> float:
    """Source coordinate of the crop's first pixel: random when the image is big enough, else centred."""
    if s == 1.0:
        return float(rng.integers(n - size + 1)) if n >= size else float(-((size - n) // 2))
    span = size / s
    return float(rng.uniform(0, n - span)) if n >= span else (n - span) / 2


def _photometric(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, strength: float) -> np.ndarray:
    """Stain, colour, blur and noise jitter of a 3xHxW float32 image in [0, 1]; strength scales every knob."""
    if (sigma := cfg.hed_sigma * strength) > 0:
        x = np.clip(_hed_jitter(x, rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)), 0, 1)
    matrix, offset = _colour_map(x, rng, cfg, strength)
    x = np.clip(_mix(x, matrix) + offset[:, None, None], 0, 1)
    if rng.random() < cfg.blur_prob * strength:
        sigma = float(rng.uniform(*cfg.blur_sigma))
        x = ndi.gaussian_filter(x, (0, sigma, sigma))
    if (noise := cfg.noise_std * strength) > 0:
        x = np.clip(x + np.float32(noise) * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    return x


def _stain_jitter(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """The labeled view's extra stain step (``augment.stain="hed"``): H&E amounts, brightness, gamma and focus of
    another lab's slides, on a 3xHxW float32 image in [0, 1]. All zero strengths give the image back.

    Labeled view only: the supervised loss is where the model learns what a nucleus looks like, and the unlabeled
    strong view already carries the full-strength jitter of :func:`_photometric`."""
    s, b = cfg.stain_scale, cfg.stain_shift
    x = np.clip(_hed_jitter(x, rng.uniform(1 - s, 1 + s, 3), rng.uniform(-b, b, 3)), 0, 1)
    brightness = np.float32(rng.uniform(1 - cfg.stain_brightness, 1 + cfg.stain_brightness))
    gamma = np.float32(np.exp(rng.uniform(-cfg.stain_gamma, cfg.stain_gamma)))
    x = np.clip(x * brightness, 0, 1) ** gamma
    if rng.random() < cfg.stain_blur_prob:
        sigma = float(rng.uniform(*cfg.blur_sigma))
        x = ndi.gaussian_filter(x, (0, sigma, sigma))
    return x


def _colour_map(
    x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast, saturation, hue and grey-scale jitter composed into one affine colour map.

    Pixels are row vectors: ``p -> p @ matrix + offset``. Every step is affine, so composing them first costs
    one pass over the image instead of one per step.
    """
    matrix, offset = np.eye(3), np.zeros(3)

    def then(step: np.ndarray, shift: np.ndarray | float = 0.0) -> None:
        nonlocal matrix, offset
        matrix, offset = matrix @ step, offset @ step + shift

    to_grey = np.outer(_LUMA, np.ones(3))  # p -> its luminance in all three channels
    if (b := cfg.brightness * strength) > 0:
        then(np.eye(3) * rng.uniform(1 - b, 1 + b))
    if (c := cfg.contrast * strength) > 0:
        mean = (x.mean(axis=(1, 2)) @ matrix + offset) @ _LUMA
        f = rng.uniform(1 - c, 1 + c)
        then(np.eye(3) * f, (1 - f) * mean)
    if (s := cfg.saturation * strength) > 0:
        f = rng.uniform(1 - s, 1 + s)
        then(f * np.eye(3) + (1 - f) * to_grey)
    if (h := cfg.hue * strength) > 0:
        angle = 2 * np.pi * rng.uniform(-h, h)
        cos, sin = np.cos(angle), np.sin(angle)
        then(_YIQ_FROM_RGB @ np.array([[1, 0, 0], [0, cos, sin], [0, -sin, cos]]) @ _RGB_FROM_YIQ)
    if rng.random() < cfg.grey_prob * strength:
        then(to_grey)
    return matrix, offset.astype(np.float32)


def _hed_jitter(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale and shift each stain's optical density (haematoxylin, eosin, DAB; Ruifrok-Johnston vectors).

    Uses skimage's stain matrices directly because rgb2hed clips negative stain amounts, so rgb2hed followed by
    hed2rgb would change colours even with no jitter.
    """
    stains = _mix(-np.log(np.maximum(x, np.float32(1e-6))), hed_from_rgb)
    stains = stains * alpha.astype(np.float32)[:, None, None] + beta.astype(np.float32)[:, None, None]
    return np.exp(-_mix(stains, rgb_from_hed))


# skimage's rgb2gray and rgb2yiq/yiq2rgb as matrices acting on pixel row vectors (images of the basis colours).
_LUMA = rgb2gray(np.eye(3)[None])[0]
_YIQ_FROM_RGB, _RGB_FROM_YIQ = rgb2yiq(np.eye(3)), yiq2rgb(np.eye(3))


def _mix(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """3xHxW image -> each pixel's channel row vector times a 3x3 matrix.

    Nine scaled plane additions: several times faster than einsum or BLAS (whose threads stall when data-loader
    workers share the cores) on planar float32 images.
    """
    out = np.empty_like(x)
    for d in range(3):
        np.multiply(x[0], np.float32(matrix[0, d]), out=out[d])
        for c in (1, 2):
            out[d] += x[c] * np.float32(matrix[c, d])
    return out


def _check(image: np.ndarray, instances: np.ndarray | None = None) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    if instances is not None and instances.shape != image.shape[:2]:
        raise ValueError(f"instance map shape {instances.shape} does not match image shape {image.shape[:2]}")


def _chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def labeled_view(
    image: np.ndarray, instances: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented (3xSxS float32 image, SxS int32 instances relabelled 1..K) of a labeled image."""
    _check(image, instances)
    geometry = sample_geometry(image.shape[:2], rng, cfg)
    x = _chw(geometry.image(image)) / np.float32(255)
    if cfg.labeled_photometric:
        x = _photometric(x, rng, cfg, cfg.labeled_strength)
    if cfg.stain == "hed":
        x = _stain_jitter(x, rng, cfg)
    return x, geometry.labels(instances)


def paired_views(
    image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, strong_views: int = 1
) -> tuple[np.ndarray, ...]:
    """(weak, strong, ...) 3xSxS float32 views of one image: one geometry, photometric changes on the strong ones.

    Each of the ``strong_views`` strong views has its own photometric draw, made after the earlier ones', so the
    first strong view is the same whatever their number (UniMatch's second view leaves the others' streams alone).
    """
    _check(image)
    weak = _chw(sample_geometry(image.shape[:2], rng, cfg).image(image)) / np.float32(255)
    return weak, *(_photometric(weak, rng, cfg, 1.0) for _ in range(strong_views))


def eval_view(image: np.ndarray) -> np.ndarray:
    """The un-augmented 3xHxW float32 image in [0, 1], as seen at validation and inference."""
    _check(image)
    return _chw(image.astype(np.float32) / np.float32(255))
