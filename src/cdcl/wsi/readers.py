"""Slides without torch: readers, pyramid level choice and tissue mask.

Readers share one small protocol: OpenSlide, tiffslide as a fallback, and an in-memory array. ``read_region``
takes coordinates and sizes *at the requested level* and returns RGB uint8; transparent or out-of-slide
pixels read as white (background), so callers never see premultiplied alpha.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu

from cdcl.errors import CdclError, squashed
from cdcl.ranges import MAX_UPSAMPLING, RESIDUAL_TOLERANCE, check_mpp, plausible_mpp

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
THUMBNAIL_CHUNK = 4096  # a level larger than this squared is shrunk to a thumbnail in pieces of this side
SATURATION_BOUNDS = (0.04, 0.15)  # Otsu's saturation threshold is clamped into this range (see tissue_mask)
THUMB_SIDE = 2048  # thumbnail for the tissue mask and the overlay: fixed, whatever the slide size
# what OpenSlide opens (tiffslide: TIFF and SVS); MRXS data folders and other files in a folder are skipped
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


class SlideReader(Protocol):
    name: str  # for messages: the file path, or a description
    dimensions: tuple[int, int]  # (width, height) of level 0
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # microns per pixel of level 0

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...

    def thumbnail(self, max_side: int) -> np.ndarray: ...

    def reopen(self) -> SlideReader:
        """An independent reader of the same slide, so each DataLoader worker has its own file handle."""
        ...


def _to_rgb(region: Image.Image) -> np.ndarray:
    """RGB array of a PIL region, compositing any alpha over the white background."""
    if region.mode == "RGBA":
        canvas = Image.new("RGB", region.size, BACKGROUND)
        canvas.paste(region, mask=region.getchannel("A"))
        region = canvas
    return np.asarray(region.convert("RGB"))


def _read_within(
    size: tuple[int, int], x: int, y: int, width: int, height: int, fetch: Callable[[int, int, int, int], np.ndarray]
) -> np.ndarray:
    """A region on a white canvas: ``fetch(x, y, w, h)`` is asked only for the part inside the level's ``size``
    (backends disagree on what lies outside: black, transparent or an error)."""
    out = np.full((height, width, 3), BACKGROUND, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, size[0]), min(y + height, size[1])
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = fetch(x0, y0, x1 - x0, y1 - y0)
    return out


def _silence_abandoned_reads() -> None:
    """tiffslide reads through zarr's asyncio tasks: when one fails, its siblings are abandoned, and at exit asyncio
    logs each with a traceback ("Task exception was never retrieved", "coroutine ... was never awaited"). The first
    failure is the one reported (as a CdclError that ends the command, or in a batch that slide), so the rest is
    silenced, for the rest of the process."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


class FileSlideReader:
    """A slide file opened with ``openslide`` or ``tiffslide`` (both expose the OpenSlide API)."""

    def __init__(self, path: str | Path, backend: str, mpp_override: float | None = None) -> None:
        self.name = str(path)
        self.backend = backend
        self._mpp_override = mpp_override
        if backend == "openslide":
            import openslide

            self._slide = openslide.OpenSlide(str(path))
            mpp_key = openslide.PROPERTY_NAME_MPP_X
        else:
            import tiffslide

            self._slide = tiffslide.TiffSlide(str(path))
            mpp_key = tiffslide.PROPERTY_NAME_MPP_X
        self.dimensions = tuple(self._slide.dimensions)
        self.level_count = self._slide.level_count
        self.level_dimensions = tuple(tuple(d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        stored = self._slide.properties.get(mpp_key)
        self.mpp = mpp_override if mpp_override is not None else (float(stored) if stored not in (None, "") else None)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        scale = self.level_downsamples[level]

        def fetch(x0: int, y0: int, w: int, h: int) -> np.ndarray:
            return self._read(
                f"level {level} at ({x0}, {y0})",
                lambda: self._slide.read_region((round(x0 * scale), round(y0 * scale)), level, (w, h)),
            )

        return _read_within(self.level_dimensions[level], x, y, width, height, fetch)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """At most ``max_side`` px per side, from the level the backend would shrink. OpenSlide's
        ``get_thumbnail`` decodes that whole level at once: fine for a pyramid, but for a slide without small
        levels the whole slide, so a large level is shrunk piece by piece instead."""
        level = self._slide.get_best_level_for_downsample(max(self.dimensions) / max_side)
        width, height = self.level_dimensions[level]
        if width * height <= THUMBNAIL_CHUNK**2:
            return self._read("the thumbnail", lambda: self._slide.get_thumbnail((max_side, max_side)))
        scale = max_side / max(width, height)  # thumbnail px per level px
        canvas = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), BACKGROUND)
        for y in range(0, height, THUMBNAIL_CHUNK):
            for x in range(0, width, THUMBNAIL_CHUNK):
                x1, y1 = min(x + THUMBNAIL_CHUNK, width), min(y + THUMBNAIL_CHUNK, height)
                box = [round(v * scale) for v in (x, y, x1, y1)]
                if box[2] > box[0] and box[3] > box[1]:
                    piece = Image.fromarray(self.read_region(level, x, y, x1 - x, y1 - y))
                    canvas.paste(piece.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BOX), tuple(box[:2]))
        return np.asarray(canvas)

    def _read(self, what: str, read: Callable[[], Image.Image]) -> np.ndarray:
        """A damaged file fails deep inside the backend (OpenSlideError, tifffile, zarr, codecs): one line instead."""
        try:
            return _to_rgb(read())
        except Exception as exc:  # noqa: BLE001 - the backends raise many types for the same damage
            detail = squashed(exc, 160)
            _silence_abandoned_reads()
            raise CdclError(
                f"cannot read {what} of the slide: damaged file? ({type(exc).__name__}: {detail})", self.name
            ) from None

    def reopen(self) -> FileSlideReader:
        return FileSlideReader(self.name, self.backend, self._mpp_override)

    def __reduce__(self) -> tuple:
        """Pickling (spawned DataLoader workers) re-opens the file instead of copying a native handle."""
        return FileSlideReader, (self.name, self.backend, self._mpp_override)


class ArrayReader:
    """An in-memory slide (tests, small images): levels are built by halving until the short side is small."""

    def __init__(self, image: np.ndarray, mpp: float | None, name: str = "<array>", min_side: int = 256) -> None:
        self.name = name
        self.mpp = mpp
        self._levels = [np.ascontiguousarray(image)]
        while min(self._levels[-1].shape[:2]) // 2 >= min_side:
            self._levels.append(np.asarray(Image.fromarray(self._levels[-1]).reduce(2)))
        self.level_count = len(self._levels)
        self.level_dimensions = tuple((a.shape[1], a.shape[0]) for a in self._levels)
        self.dimensions = self.level_dimensions[0]
        self.level_downsamples = tuple(self.dimensions[0] / w for w, _ in self.level_dimensions)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        src = self._levels[level]
        return _read_within(
            self.level_dimensions[level], x, y, width, height, lambda x0, y0, w, h: src[y0 : y0 + h, x0 : x0 + w]
        )

    def thumbnail(self, max_side: int) -> np.ndarray:
        level = next((i for i in reversed(range(self.level_count)) if max(self._levels[i].shape[:2]) >= max_side), 0)
        image = Image.fromarray(self._levels[level])
        image.thumbnail((max_side, max_side))
        return np.asarray(image)

    def reopen(self) -> ArrayReader:
        return self


def open_slide(path: str | Path, mpp_override: float | None = None, need_mpp: bool = True) -> FileSlideReader:
    """Open with OpenSlide, else tiffslide; unreadable files and a missing or implausible resolution (when
    ``need_mpp``: the model has one to match) are one-line CdclErrors."""
    path = Path(path)
    if not path.is_file():
        raise CdclError("slide file not found", path)
    if mpp_override is not None:
        check_mpp(mpp_override, "--mpp")
    failures = []
    for backend in ("openslide", "tiffslide"):
        try:
            reader = FileSlideReader(path, backend, mpp_override)
            break
        except Exception as exc:  # noqa: BLE001 - each backend has its own error types; report both
            failures.append(f"{backend}: {squashed(exc, 120) or type(exc).__name__}")
    else:
        raise CdclError(f"cannot read slide ({'; '.join(failures)})", path)
    if not need_mpp:
        return reader
    if reader.mpp is None or not reader.mpp > 0:
        raise CdclError("no resolution metadata (microns per pixel) in the slide; pass --mpp", path)
    if not plausible_mpp(reader.mpp):
        raise CdclError(
            f"implausible resolution in the slide's metadata: {reader.mpp:.4g} microns per pixel (a "
            "default 72 dpi header?); pass --mpp",
            path,
        )
    return reader


def choose_level(reader: SlideReader, target_mpp: float | None) -> tuple[int, float]:
    """``(level, residual)``: the coarsest level not coarser than the target resolution (+10%), i.e. the
    closest one that needs no upsampling (level 0 when even that is too coarse), and ``residual`` = target mpp /
    level mpp, the resize factor still to apply (1.0 within 10%). No target (checkpoint without mpp): level 0."""
    if target_mpp is None or reader.mpp is None:
        return 0, 1.0
    mpps = [reader.mpp * d for d in reader.level_downsamples]
    finer = [i for i, m in enumerate(mpps) if m <= target_mpp * (1 + RESIDUAL_TOLERANCE)]
    level = max(finer, key=mpps.__getitem__) if finer else 0
    residual = target_mpp / mpps[level]
    if residual < 1 / MAX_UPSAMPLING:
        raise CdclError(
            f"the slide's {reader.mpp:.4g} microns per pixel are more than {MAX_UPSAMPLING}x coarser than the "
            f"model's {target_mpp:.4g}: scanned at too low a magnification for it (or wrong --mpp)",
            reader.name,
        )
    return level, 1.0 if abs(residual - 1) <= RESIDUAL_TOLERANCE else residual


def tissue_mask(thumbnail: np.ndarray, source: str | None = None) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: HSV saturation above Otsu's threshold, clamped to
    ``SATURATION_BOUNDS`` so that a slide that is all tissue is not split in two by Otsu and a blank slide
    (white, grey or black: all unsaturated) has no tissue. No tissue at all is a user error."""
    rgb = thumbnail.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    threshold = threshold_otsu(saturation) if np.ptp(saturation) > 0 else SATURATION_BOUNDS[1]
    mask = saturation > np.clip(threshold, *SATURATION_BOUNDS)
    if not mask.any():
        raise CdclError("no tissue found (the thumbnail has no stained, saturated region)", source)
    return mask
