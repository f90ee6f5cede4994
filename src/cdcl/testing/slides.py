"""Test helpers for inference (also used by benchmarks/wsi_memory.py): pyramidal TIFF slides built from real
MoNuSeg tiles with tifffile, and stand-in models/predictors with the real model's interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from skimage.draw import disk

from cdcl.inference.predictor import Predictor
from cdcl.instances.postprocess import PostprocessParams

MONUSEG_IMAGES = Path("monuseg") / "train" / "images"
# Disc centres (row, col) placed on and across the seams of a 128 px grid: on a vertical seam, on a horizontal
# seam, on a four-tile corner, exactly centred on a seam (centroid x = 256.0: the half-open core rule gives it
# to the right-hand tile), near the slide edge, and well inside a tile.
DISCS = [(64, 128), (128, 300), (256, 256), (200, 255.5), (383.5, 100), (20, 430), (440, 440), (330, 180), (60, 20)]
RADIUS = 12


def disc_image() -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    """A 460x470 synthetic slide of purple discs on white; expected (x, y, area) per disc (level-0 px)."""
    image = np.full((460, 470, 3), 245, np.uint8)
    expected = []
    for centre in DISCS:
        rr, cc = disk(centre, RADIUS, shape=image.shape[:2])
        image[rr, cc] = (90, 30, 120)
        expected.append((cc.mean() + 0.5, rr.mean() + 0.5, len(rr)))
    return image, sorted(expected)


def monuseg_mosaic(shared_data: Path, width: int, height: int, margin: int = 0) -> np.ndarray:
    """An HxWx3 uint8 mosaic of the MoNuSeg training images (sorted, cycled, row-major), inside a white
    ``margin`` (background for the tissue mask to skip)."""
    sources = sorted((shared_data / MONUSEG_IMAGES).glob("*.tif"))
    out = np.full((height, width, 3), 255, np.uint8)
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    k = 0
    for y in range(0, inner_h, 1000):
        for x in range(0, inner_w, 1000):
            tile = np.asarray(Image.open(sources[k % len(sources)]).convert("RGB"))
            h, w = min(1000, inner_h - y), min(1000, inner_w - x)
            out[margin + y : margin + y + h, margin + x : margin + x + w] = tile[:h, :w]
            k += 1
    return out


def write_pyramid(
    path: Path, image: np.ndarray, mpp: float | None, *, tile: int = 256, compression: str = "zlib", min_side: int = 256
) -> Path:
    """A tiled pyramidal TIFF, one page per level (halved until the short side would drop below ``min_side``),
    with XResolution/YResolution in pixels per centimetre when ``mpp`` is given (OpenSlide's generic TIFF
    reads microns-per-pixel from them)."""
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * image.shape[1] / level.shape[1])
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                level, tile=(tile, tile), photometric="rgb", compression=compression, subfiletype=1 if i else 0, **extra
            )
    return path


class DarkStandIn(torch.nn.Module):
    """Pointwise stand-in model: class-1 logit = ``sharpness * (level - mean RGB)``, so dark (nucleus-like)
    pixels are foreground. A 1x1 convolution: its output at a pixel depends on that pixel only, which makes
    tiled and whole-image predictions equal and turns crisp synthetic images into exact masks."""

    def __init__(self, level: float = 0.45, sharpness: float = 40.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1] = -sharpness / 3
            self.conv.bias.copy_(torch.tensor([0.0, sharpness * level]))
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(x)}


def stand_in_predictor(
    model: torch.nn.Module | None = None,
    *,
    mpp: float | None = 0.25,
    window: int = 128,
    batch_size: int = 4,
    tta: str = "none",
) -> Predictor:
    """A CPU ``Predictor`` around a stand-in model with default post-processing."""
    return Predictor(
        model=model or DarkStandIn(),
        device=torch.device("cpu"),
        postprocess=PostprocessParams(),
        mpp=mpp,
        window=window,
        overlap=0.25,
        batch_size=batch_size,
        amp=False,
        config=None,
        tta=tta,
    )


def write_untrained_checkpoint(path: Path, overrides: list[str]) -> Path:
    """A cdcl checkpoint of an untrained network built from config ``overrides`` (``key=value``): the real loader
    and network without a training run, for plumbing tests and speed benchmarks."""
    from cdcl.checkpoint import save_checkpoint
    from cdcl.config import load_config
    from cdcl.models import build_model

    config = load_config(None, [*overrides, "model.pretrained=false"])
    weights = build_model(config.model).state_dict()
    save_checkpoint(path, {"config": config.to_dict(), "weights": {"student": weights}, "postprocess": {}})
    return path
