"""Synthetic H&E-like tiles with instance masks, for the demo and the tests.

Tiles are painted as stain densities (haematoxylin, eosin) and turned into RGB with skimage's Ruifrok-Johnston
stain vectors, the inverse of the colour deconvolution used on real slides. Stroma is pink with darker collagen
fibres and a haematoxylin tinge; nuclei are purple to dark blue, of varied size and shape, with chromatin
texture, some pale (vesicular) ones with a dark rim, and clusters of touching nuclei that keep distinct ids. Stain
strength varies per tile and red blood cells act as unlabelled distractors, so no single threshold separates
nuclei from the rest, yet a small network learns them quickly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb_from_hed
from skimage.draw import line_aa, polygon
from skimage.segmentation import find_boundaries

from cdcl.io import ensure_writable_dir, save_png

log = logging.getLogger(__name__)

_MIN_AREA = 12  # pixels; smaller leftovers of a nucleus cut by the tile edge or its neighbours are dropped
_MAX_OVERLAP = 0.3  # a new nucleus may hide at most this share of itself or of any neighbour


def synthetic_tile(
    rng_or_seed: np.random.Generator | int | None, size: int = 256, *, n_nuclei: tuple[int, int] = (15, 45)
) -> tuple[np.ndarray, np.ndarray]:
    """One H&E-like tile: (size x size x 3 uint8 RGB, size x size int32 instance map, 0 = background).

    ``n_nuclei`` is the range of nuclei per 256 x 256 pixels (about MoNuSeg's density), scaled to the tile's area;
    a few fewer may be placed when the tile is too crowded for them.
    """
    rng = np.random.default_rng(rng_or_seed)
    shape = (size, size)
    instances, darkness = _nuclei(shape, rng, n_nuclei)
    haem, eosin = _stroma(shape, rng)
    haem, eosin = _add_nuclei(haem, eosin, instances, darkness, rng)
    cells = _red_blood_cells(instances, rng)
    return _to_rgb(np.stack([haem, eosin + cells, 0.4 * cells], axis=-1), rng), instances


def _noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation; wide blurs run at reduced resolution (same look)."""
    step = max(1, int(sigma // 3))
    small = ndi.gaussian_filter(rng.standard_normal([-(-n // step) for n in shape]), sigma / step)
    field = ndi.zoom(small, step, order=1)[: shape[0], : shape[1]] if step > 1 else small
    return field / (field.std() + 1e-12)


def _stroma(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stain densities of the tissue around the nuclei: eosin with fibres, a haematoxylin tinge, white gaps."""
    eosin = rng.uniform(0.3, 0.6) * (1 + 0.25 * _noise(shape, 12, rng))
    haem = rng.uniform(0.15, 0.6) * (1 + 0.5 * _noise(shape, 4, rng))
    fibres = _fibres(shape, rng)
    eosin = eosin + rng.uniform(0.3, 0.8) * fibres
    haem = haem + rng.uniform(0.1, 0.5) * fibres
    if rng.random() < 0.6:  # lumens, fat and tears: little or no stain
        gaps = ndi.gaussian_filter((_noise(shape, 14, rng) > rng.uniform(0.8, 1.6)).astype(float), 2)
        eosin, haem = eosin * (1 - 0.9 * gaps), haem * (1 - 0.9 * gaps)
    return np.clip(haem, 0, None), np.clip(eosin, 0, None)


def _fibres(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Collagen: fine streaks along one main direction plus a few thicker wavy fibres, in [0, ~1]."""
    angle = rng.uniform(0, np.pi)
    out = np.zeros(shape)
    for _ in range(rng.integers(6, 20)):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        heading = angle + rng.normal(0, 0.3)
        strength = rng.uniform(0.3, 1.0)
        for _ in range(rng.integers(15, 60)):
            heading += rng.normal(0, 0.15)
            y2, x2 = y + 4 * np.sin(heading), x + 4 * np.cos(heading)
            rr, cc, val = line_aa(int(y), int(x), int(y2), int(x2))
            keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
            out[rr[keep], cc[keep]] = np.maximum(out[rr[keep], cc[keep]], strength * val[keep])
            y, x = y2, x2
    out = ndi.gaussian_filter(out, rng.uniform(0.8, 1.8)) * 2
    streaks = ndi.gaussian_filter(rng.standard_normal(shape), (1.5, 6))
    streaks = ndi.rotate(streaks, np.degrees(angle), reshape=False, order=1, mode="reflect")
    return np.clip(out, 0, 1) + 0.1 * np.clip(streaks / (streaks.std() + 1e-12), 0, None)


def _nuclei(
    shape: tuple[int, int], rng: np.random.Generator, n_nuclei: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Instance map of non-overlapping nuclei (touching allowed) and a darkness factor per id (index 0 unused)."""
    instances = np.zeros(shape, np.int32)
    mean_radius = rng.uniform(5.5, 10)
    clusters = rng.uniform(0, shape[0], (rng.integers(1, 5), 2))
    pale_share = rng.uniform(0.1, 0.4)
    darkness = [0.0]
    target = max(1, round(rng.integers(n_nuclei[0], n_nuclei[1] + 1) * shape[0] * shape[1] / 256**2))
    for _ in range(4 * target):
        if len(darkness) > target:
            break
        radius = float(np.clip(mean_radius * rng.lognormal(0, 0.25), 4, 14))
        if rng.random() < 0.5:  # crowded: near a cluster centre, often touching a neighbour
            centre = clusters[rng.integers(len(clusters))] + rng.normal(0, 2 * radius + 6, 2)
        else:
            centre = rng.uniform(0, shape[0], 2)
        rows, cols = _nucleus_outline(centre, radius, rng)
        rr, cc = polygon(rows, cols, shape)
        if _place(instances, rr, cc, len(darkness)):
            darkness.append(rng.uniform(0.3, 0.55) if rng.random() < pale_share else rng.uniform(0.8, 1.3))
    return instances, np.array(darkness)


def _nucleus_outline(centre: np.ndarray, radius: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Polygon of an ellipse with a wobbly boundary (low harmonics of the radius)."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = 1 + sum(rng.normal(0, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    a, b = radius, radius * rng.uniform(0.55, 1.0)
    turn = rng.uniform(0, np.pi)
    x, y = a * np.cos(theta) * wobble, b * np.sin(theta) * wobble
    return centre[0] + x * np.sin(turn) + y * np.cos(turn), centre[1] + x * np.cos(turn) - y * np.sin(turn)


def _place(instances: np.ndarray, rr: np.ndarray, cc: np.ndarray, new_id: int) -> bool:
    """Draw a nucleus behind the existing ones if it hides little of them and stays one piece."""
    if len(rr) < _MIN_AREA:
        return False
    under = instances[rr, cc]
    hidden = under[under > 0]
    if len(hidden) > _MAX_OVERLAP * len(rr):
        return False
    if len(hidden):
        ids, counts = np.unique(hidden, return_counts=True)
        if np.any(counts > _MAX_OVERLAP * np.bincount(instances.ravel(), minlength=ids.max() + 1)[ids]):
            return False
    free = under == 0
    if free.sum() < _MIN_AREA:
        return False
    box = np.zeros((rr.max() - rr.min() + 1, cc.max() - cc.min() + 1), bool)
    box[rr[free] - rr.min(), cc[free] - cc.min()] = True
    if ndi.label(box)[1] != 1:
        return False
    instances[rr[free], cc[free]] = new_id
    return True


def _add_nuclei(
    haem: np.ndarray, eosin: np.ndarray, instances: np.ndarray, darkness: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint haematoxylin into the nuclei: chromatin texture, dark rims on pale nuclei, soft borders."""
    inside = instances > 0
    dark = darkness[instances]
    h_level = rng.uniform(0.8, 2.2)  # per-tile haematoxylin strength (staining protocol, section thickness)
    chromatin = 1 + 0.35 * _noise(haem.shape, 0.9, rng)
    rim = (ndi.distance_transform_edt(~find_boundaries(instances, mode="inner")) < 1.5) & (dark < 0.7)
    nucleus = h_level * dark * chromatin * (1 + 1.2 * rim)
    halo = ndi.gaussian_filter(inside.astype(float), 5)  # cytoplasm around crowded nuclei
    cover = ndi.gaussian_filter(inside.astype(float), 0.7)  # the same blur on mask and density: soft borders
    haem = (1 - cover) * (haem + 0.4 * halo) + ndi.gaussian_filter(np.where(inside, nucleus, 0), 0.7)
    return np.clip(haem, 0, None), eosin + 0.15 * halo


def _red_blood_cells(instances: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small dense red discs between the nuclei (eosin plus a brown-orange component): dark, but not nuclei."""
    cells = np.zeros(instances.shape)
    if rng.random() < 0.5:
        return cells
    for _ in range(rng.integers(3, 14)):
        centre = rng.uniform(0, instances.shape[0], 2)
        rr, cc = polygon(*_nucleus_outline(centre, rng.uniform(3.5, 5.5), rng), instances.shape)
        free = instances[rr, cc] == 0
        cells[rr[free], cc[free]] = rng.uniform(1.0, 1.8)
    return ndi.gaussian_filter(cells, 0.8)


def _to_rgb(stains: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 stain densities (haematoxylin, eosin, DAB) -> RGB uint8, with a little sensor noise."""
    rgb = np.exp(-np.einsum("...c,cd->...d", stains, rgb_from_hed)) * rng.uniform(0.93, 1.0)  # einsum: no BLAS threads
    rgb = rgb + rng.normal(0, 0.012, rgb.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def write_synthetic_dataset(
    out_dir: str | Path, n_images: int, seed: int = 0, size: int = 256, *, masks_for: int | None = None
) -> Path:
    """Write a ``folder``-format dataset: images/synth_000.png ... and masks/synth_000.png (uint16 instances).

    Image ``i`` depends only on ``(seed, i)``, so files are byte-identical across runs and across values of
    ``n_images``. Only the first ``masks_for`` images (default all) get a mask. Leftover ``synth_*.png`` files of
    an earlier, larger run are removed so the folder holds exactly this dataset.
    """
    masks_for = n_images if masks_for is None else masks_for
    if n_images < 1 or not 0 <= masks_for <= n_images:
        raise ValueError(f"need n_images >= 1 and 0 <= masks_for <= n_images, got {n_images} and {masks_for}")
    out_dir = Path(out_dir)
    images, masks = ensure_writable_dir(out_dir / "images"), ensure_writable_dir(out_dir / "masks")
    digits = max(3, len(str(n_images - 1)))
    names = [f"synth_{i:0{digits}d}.png" for i in range(n_images)]
    for i, name in enumerate(names):
        image, instances = synthetic_tile(np.random.default_rng([seed, i]), size)
        save_png(images / name, image)
        if i < masks_for:
            save_png(masks / name, instances.astype(np.uint16))
    for folder, keep in ((images, names), (masks, names[:masks_for])):
        for stale in {p.name for p in folder.glob("synth_*.png")} - set(keep):
            (folder / stale).unlink()
    log.info("wrote %d synthetic images (%d with masks) to %s", n_images, masks_for, out_dir)
    return out_dir
