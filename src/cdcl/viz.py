"""Pictures for people: contour overlays, training curves and side-by-side comparisons (PNGs of arrays:
``cdcl.io.save_png``).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no display needed) and every file is
written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from cdcl.io import atomic_path

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 255, 0)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW or HxWxC (C = 1, 3 or 4) image -> HxWx3 uint8 for display.

    uint8 is kept as is (alpha dropped); any other dtype is stretched linearly from its minimum to its maximum.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3] if image.shape[2] != 1 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxW or HxWx{{1,3,4}} image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.copy()
    image = image.astype(np.float64)
    low, high = float(np.nanmin(image)), float(np.nanmax(image))
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.round(np.nan_to_num(scaled) * 255).astype(np.uint8)


def overlay_contours(
    image: np.ndarray, layers: list[tuple[np.ndarray, tuple[int, int, int]]], thickness: int = 1
) -> np.ndarray:
    """RGB uint8 copy of ``image`` with the nucleus outlines of each label map drawn in its colour.

    Outlines are the inner boundary pixels of every instance (so two touching nuclei show the line between
    them), widened inwards to ``thickness`` pixels. Later layers are drawn over earlier ones.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    out = to_rgb_uint8(image)
    for labels, colour in layers:
        labels = np.asarray(labels)
        if labels.shape != out.shape[:2]:
            raise ValueError(f"label map shape {labels.shape} does not match image shape {out.shape[:2]}")
        edge = find_boundaries(labels, mode="inner")
        if thickness > 1:
            edge = ndi.binary_dilation(edge, iterations=thickness - 1, mask=labels > 0)
        out[edge] = colour
    return out


def _save_figure(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in records if r.get(key) is not None and "iteration" in r]
    return [r["iteration"] for r in rows], [float(r[key]) for r in rows]


def plot_training_curves(records: list[dict], path: str | Path) -> None:
    """PNG of metrics.jsonl rows against ``iteration``: one panel per group that has data.

    Groups: every ``loss/*`` key together, every ``val/*`` key together, ``lr``, ``images_per_s``.
    Rows may hold any subset of keys; a key is drawn over the rows that have it. With no data at all the PNG
    says so, so a run that stopped early still gets its curves file.
    """
    keys = sorted({k for r in records for k in r})
    series = {k: _series(records, k) for k in keys}
    groups = [
        ("loss", [k for k in keys if k.startswith("loss/") and series[k][0]]),
        ("validation", [k for k in keys if k.startswith("val/") and series[k][0]]),
        ("learning rate", [k for k in ("lr",) if k in series and series[k][0]]),
        ("images / s", [k for k in ("images_per_s",) if k in series and series[k][0]]),
    ]
    groups = [(title, ks) for title, ks in groups if ks]
    fig = Figure(figsize=(8, 2.6 * max(len(groups), 1)))
    if not groups:
        fig.text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center")
        _save_figure(fig, path)
        return
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, ks) in zip(axes, groups):
        for key in ks:
            xs, ys = series[key]
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("iteration")
    fig.tight_layout()
    _save_figure(fig, path)


def _panel_image(image: np.ndarray, panel: np.ndarray) -> tuple[np.ndarray, dict]:
    """What to show for one panel: label maps as outlines on the image, float maps as a heat map."""
    panel = np.asarray(panel)
    if panel.ndim == 2 and (np.issubdtype(panel.dtype, np.integer) or panel.dtype == bool):
        return overlay_contours(image, [(panel, PRED_COLOUR)]), {}
    if panel.ndim == 2:
        return panel, {"cmap": "magma", "vmin": 0.0, "vmax": max(1.0, float(np.nanmax(panel)))}
    return to_rgb_uint8(panel), {}


def plot_comparison_grid(image: np.ndarray, panels: list[tuple[str, np.ndarray]], path: str | Path) -> None:
    """PNG of ``image`` followed by titled panels side by side (e.g. image | GT | supervised | CDCL).

    A 2-D integer/bool panel is a label map, drawn as outlines on the image; a 2-D float panel (a probability
    map) as a heat map; an HxWx3 panel as it is.
    """
    shown = [("image", to_rgb_uint8(image), {})] + [(title, *_panel_image(image, p)) for title, p in panels]
    height, width = np.asarray(image).shape[:2]
    panel_inches = 3.5
    fig = Figure(figsize=(panel_inches * len(shown), panel_inches * height / width + 0.5))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (title, picture, style) in zip(axes, shown):
        ax.imshow(picture, interpolation="nearest", **style)
        ax.set_title(title)
        ax.set_axis_off()
    fig.tight_layout()
    _save_figure(fig, path)


def plot_histogram(values: list[float], path: str | Path, xlabel: str, title: str) -> None:
    """A histogram of ``values`` (an empty one says so in its title rather than failing)."""
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.hist(values, bins=max(1, min(30, len(values))), color="#6a3d9a")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, path)
