"""``cdcl data show``: a PNG grid of training views, to check augmentation settings by eye before training.

One row per image: the original, the labeled view with its instance outlines (blank when the image has no
mask), and the weak/strong pair the semi-supervised methods compare pixel by pixel.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from cdcl.data.views import AugmentConfig, labeled_view, paired_views

log = logging.getLogger(__name__)

COLUMNS = ("original", "labeled + outlines", "weak", "strong")
_GAP = 4  # pixels between panels
_HEADER = 16  # pixels of column titles
_OUTLINE = (0, 255, 0)
_BLANK = 200  # grey level of the labeled panel of an image without mask


def views_grid(items: list[tuple[np.ndarray, np.ndarray | None]], cfg: AugmentConfig, seed: int) -> np.ndarray:
    """RGB uint8 grid, one row per (image, instances or None): original, labeled view, weak, strong."""
    size = cfg.crop_size
    step = size + _GAP
    grid = np.full((_HEADER + len(items) * step, len(COLUMNS) * step - _GAP, 3), 255, np.uint8)
    for row, (image, instances) in enumerate(items):
        panels = [_fit(image, size), *_row_views(image, instances, cfg, np.random.default_rng([seed, row]))]
        top = _HEADER + row * step
        for col, panel in enumerate(panels):
            grid[top : top + size, col * step : col * step + size] = panel
    return _titles(grid, step)


def _row_views(
    image: np.ndarray, instances: np.ndarray | None, cfg: AugmentConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    size = cfg.crop_size
    if instances is None:
        labeled = np.full((size, size, 3), _BLANK, np.uint8)
    else:
        view, labels = labeled_view(image, instances, rng, cfg)
        labeled = _to_uint8(view)
        labeled[find_boundaries(labels, mode="inner")] = _OUTLINE
    weak, strong = paired_views(image, rng, cfg)
    return [labeled, _to_uint8(weak), _to_uint8(strong)]


def _to_uint8(view: np.ndarray) -> np.ndarray:
    """3xHxW float in [0, 1] -> HxWx3 uint8."""
    return np.round(view.transpose(1, 2, 0) * 255).astype(np.uint8)


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image shrunk (never enlarged) to fit a size x size panel, centred on white."""
    pil = Image.fromarray(image)
    pil.thumbnail((size, size), Image.Resampling.LANCZOS)
    panel = np.full((size, size, 3), 255, np.uint8)
    h, w = pil.height, pil.width
    panel[(size - h) // 2 : (size - h) // 2 + h, (size - w) // 2 : (size - w) // 2 + w] = np.asarray(pil)
    return panel


def _titles(grid: np.ndarray, step: int) -> np.ndarray:
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    for col, title in enumerate(COLUMNS):
        draw.text((col * step + 2, 2), title, fill=(0, 0, 0))
    return np.asarray(pil)
