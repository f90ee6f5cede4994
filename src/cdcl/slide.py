"""Slides without torch: readers, pyramid level choice, tissue mask, the tile grid and per-tile nuclei.

Readers share one small protocol: OpenSlide, tiffslide as a fallback, and an in-memory array. ``read_region``
takes coordinates and sizes *at the requested level* and returns RGB uint8; transparent or out-of-slide
pixels read as white (background), so callers never see premultiplied alpha.

Nothing here imports torch, so the post-processing pool of ``cdcl.wsi`` starts its workers in a fraction of
the time and memory (they run :func:`tile_nuclei`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu

from cdcl.errors import CdclError
from cdcl.export import label_centroids, nuclei_polygons, nuclei_table
from cdcl.postprocess import instances_from_maps

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
RESIDUAL_TOLERANCE = 0.10  # a level within 10% of the target resolution is used without resizing
PLAUSIBLE_MPP = (0.01, 50.0)  # microns per pixel: 1000x to 0.2x objectives; outside, the metadata is wrong
MAX_UPSAMPLING = 4  # a slide needing more enlargement to reach the model's resolution holds too little detail
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


def _read_within(size: tuple[int, int], x: int, y: int, width: int, height: int, fetch: Callable[[int, int, int, int], np.ndarray]) -> np.ndarray:
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
            return self._read(f"level {level} at ({x0}, {y0})",
                              lambda: self._slide.read_region((round(x0 * scale), round(y0 * scale)), level, (w, h)))

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
            detail = " ".join(str(exc).split())[:160]
            _silence_abandoned_reads()
            raise CdclError(f"cannot read {what} of the slide: damaged file? ({type(exc).__name__}: {detail})", self.name) from None

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
        return _read_within(self.level_dimensions[level], x, y, width, height, lambda x0, y0, w, h: src[y0 : y0 + h, x0 : x0 + w])

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
    if mpp_override is not None and not PLAUSIBLE_MPP[0] <= mpp_override <= PLAUSIBLE_MPP[1]:
        raise CdclError(f"--mpp must be between {PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]} microns per pixel, got {mpp_override}")
    failures = []
    for backend in ("openslide", "tiffslide"):
        try:
            reader = FileSlideReader(path, backend, mpp_override)
            break
        except Exception as exc:  # noqa: BLE001 - each backend has its own error types; report both
            failures.append(f"{backend}: {' '.join(str(exc).split())[:120] or type(exc).__name__}")
    else:
        raise CdclError(f"cannot read slide ({'; '.join(failures)})", path)
    if not need_mpp:
        return reader
    if reader.mpp is None or not reader.mpp > 0:
        raise CdclError("no resolution metadata (microns per pixel) in the slide; pass --mpp", path)
    if not PLAUSIBLE_MPP[0] <= reader.mpp <= PLAUSIBLE_MPP[1]:
        raise CdclError(f"implausible resolution in the slide's metadata: {reader.mpp:.4g} microns per pixel (a "
                        "default 72 dpi header?); pass --mpp", path)
    return reader


def open_slides(paths: Sequence[Path], mpp_override: float | None, target_mpp: float | None) -> list[FileSlideReader]:
    """Every slide of a batch opened (:func:`open_slide`) and checked against ``target_mpp`` (the resolution to
    read at; None: level 0) before any is read, so a bad one stops the command before it has done anything."""
    readers = [open_slide(path, mpp_override, need_mpp=target_mpp is not None) for path in paths]
    for reader in readers:
        choose_level(reader, target_mpp)
    return readers


def for_each_slide(readers: Sequence[SlideReader], work: Callable[[SlideReader], None]) -> None:
    """``work(reader)`` for every slide of a batch. A slide that fails with a CdclError (no tissue, a damaged tile,
    another run writing it) is reported and the others still run; then one CdclError names every failed slide.
    A single slide's own error is raised as it is."""
    failures = []
    for number, reader in enumerate(readers, 1):
        if len(readers) > 1:
            log.info("slide %d of %d: %s", number, len(readers), reader.name)
        try:
            work(reader)
        except CdclError as err:
            if len(readers) == 1:
                raise
            log.error("%s (going on with the other slides)", err)
            failures.append(str(err))
    if failures:
        rest = "the others are done; " if len(failures) < len(readers) else ""
        raise CdclError(f"{len(failures)} of {len(readers)} slides failed ({rest}a re-run keeps what is done): "
                        f"{'; '.join(failures)}")


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
        raise CdclError(f"the slide's {reader.mpp:.4g} microns per pixel are more than {MAX_UPSAMPLING}x coarser than the "
                        f"model's {target_mpp:.4g}: scanned at too low a magnification for it (or wrong --mpp)", reader.name)
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


@dataclass(frozen=True)
class Grid:
    """Tiles at the working resolution (the chosen level resized by ``residual``)."""

    level: int
    residual: float  # level pixels per working pixel
    scale: float  # level-0 pixels per working pixel
    width: int
    height: int
    level_size: tuple[int, int]
    tile: int
    halo: int

    @classmethod
    def for_slide(cls, reader: SlideReader, level: int, residual: float, tile: int, halo: int) -> Grid:
        level_w, level_h = reader.level_dimensions[level]
        return cls(level, residual, reader.level_downsamples[level] * residual, int(level_w / residual),
                   int(level_h / residual), (level_w, level_h), tile, halo)

    def cores(self) -> list[tuple[int, int, int, int]]:
        """``(x0, y0, x1, y1)`` of every grid cell, row-major; the list index is the tile's id."""
        return [(x, y, min(x + self.tile, self.width), min(y + self.tile, self.height))
                for y in range(0, self.height, self.tile) for x in range(0, self.width, self.tile)]

    def box(self, core: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """The core grown by the halo, clipped to the slide."""
        x0, y0, x1, y1 = core
        h = self.halo
        return max(x0 - h, 0), max(y0 - h, 0), min(x1 + h, self.width), min(y1 + h, self.height)

    def read(self, reader: SlideReader, box: tuple[int, int, int, int]) -> np.ndarray:
        """The box's pixels at the working resolution."""
        x0, y0, x1, y1 = box
        r = self.residual
        lx0, ly0 = round(x0 * r), round(y0 * r)
        lx1, ly1 = min(round(x1 * r), self.level_size[0]), min(round(y1 * r), self.level_size[1])
        region = reader.read_region(self.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        if r == 1.0:
            return region
        return np.array(Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))  # writable


def tissue_tiles(grid: Grid, mask: np.ndarray, level0_width: int, min_fraction: float = 0.0) -> list[tuple[int, tuple[int, int, int, int]]]:
    """``(id, core)`` of the grid cells that touch the tissue mask, and have at least ``min_fraction`` of their
    area in it."""
    to_mask = mask.shape[1] / level0_width * grid.scale  # mask pixels per working pixel
    tiles = []
    for index, core in enumerate(grid.cores()):
        x0, y0, x1, y1 = core
        cell = mask[int(y0 * to_mask) : int(np.ceil(y1 * to_mask)), int(x0 * to_mask) : int(np.ceil(x1 * to_mask))]
        if cell.any() and cell.mean() >= min_fraction:
            tiles.append((index, core))
    return tiles


def tile_nuclei(prob: np.ndarray, image: np.ndarray, params: Any, core: tuple[int, ...], box: tuple[int, ...], scale: float) -> list[list]:
    """``[measurements, ring]`` (level-0 pixels) of the nuclei whose centroid lies in the tile's core: the seam
    rule of ``cdcl.wsi``. ``prob`` (prediction maps, HxW or 2xHxW) and ``image`` cover ``box`` (the core plus
    halo), all in working pixels."""
    labels = instances_from_maps(prob, params)
    ids, x, y = label_centroids(labels, origin=box[:2])
    x0, y0, x1, y1 = core
    labels = np.where(np.isin(labels, ids[(x0 <= x) & (x < x1) & (y0 <= y) & (y < y1)]), labels, 0)
    offset = (box[0] * scale, box[1] * scale)
    rows = nuclei_table(labels, image, offset=offset, scale=scale)
    return [[row, ring] for row, (_, ring) in zip(rows, nuclei_polygons(labels, offset=offset, scale=scale))]


def tile_nuclei_json(*args: Any) -> str:
    """:func:`tile_nuclei` as JSON text, serialised in the post-processing worker rather than the main process."""
    return json.dumps(tile_nuclei(*args), separators=(",", ":"))


def yield_to_prediction(worker_id: int | None = None) -> None:
    """Lower this process's CPU priority: tile readers and post-processing workers give way to the forward pass,
    whose threads would otherwise all wait on the one a worker displaced (measured: ``benchmarks/wsi_memory.py``).
    Serves as a pool initializer and as a DataLoader ``worker_init_fn`` (which passes ``worker_id``)."""
    if hasattr(os, "nice"):  # POSIX only
        os.nice(5)


def ready() -> None:
    """A no-op for the post-processing pool's first jobs: a worker imports this module (about a second) on its
    first job, so ``cdcl.wsi`` sends these while the slide is being opened rather than with the first tile."""
