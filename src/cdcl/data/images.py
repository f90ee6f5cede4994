"""Reading images and instance masks from files, with every pixel layout normalised and bad files refused.

TIFFs go through ``tifffile`` (any bit depth, LZW/PackBits/Deflate via ``imagecodecs``, BigTIFF); everything
else through Pillow. The declared size is checked against a pixel budget from the header, before any pixel is
decoded, so a tiny file declaring a huge image (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import tifffile
from PIL import Image
from skimage.measure import label as connected_components

from cdcl.errors import CdclError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "image_size",
    "max_image_pixels",
    "read_foreground",
    "read_image",
    "read_label_image",
]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MAX_IMAGE_PIXELS = 200_000_000
"""Default pixel budget per image (H x W); the environment variable CDCL_MAX_IMAGE_PIXELS overrides it.

Pillow's own decompression-bomb cap (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 million pixels) also applies
to PNG, JPEG and BMP files; it is never loosened here, because that would switch it off for the whole process.
"""

T = TypeVar("T")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_TO_RGB = {"1": "L", "P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def max_image_pixels() -> int:
    """The pixel budget in force: CDCL_MAX_IMAGE_PIXELS when set, else MAX_IMAGE_PIXELS."""
    text = os.environ.get("CDCL_MAX_IMAGE_PIXELS")
    if text is None:
        return MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CdclError(f"CDCL_MAX_IMAGE_PIXELS must be a positive integer, got '{text}'")
    return value


def read_image(path: str | Path) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of an image file.

    Grey and palette images become RGB, alpha is dropped, 16-bit samples keep their top 8 bits (full range:
    65535 -> 255), bilevel images become 0/255. Unreadable, truncated, empty or oversized files raise CdclError.
    """
    path = Path(path)
    pixels = _decode(path, photometric=True)
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise CdclError(f"unsupported pixel type {pixels.dtype} (expected 8- or 16-bit unsigned samples)", path)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        pixels = np.repeat(pixels[:, :, :1], 3, axis=2)
    elif channels in (3, 4):  # RGB, RGB + alpha
        pixels = pixels[:, :, :3]
    else:
        raise CdclError(f"unsupported number of channels ({channels})", path)
    return np.ascontiguousarray(pixels)


def read_label_image(path: str | Path) -> np.ndarray:
    """H x W int32 instance label map (0 = background) from a mask file.

    Integer instance maps (uint8, uint16, int32, palette indices) are kept as they are, ids need not be
    contiguous. A binary mask (values {0, v} only) is split into connected components with 4-connectivity, so
    nuclei touching only at a corner become separate instances. Refused with CdclError: negative values,
    non-integral float values, and colour masks whose channels differ (a colour-coded mask is ambiguous: save
    instance ids in one channel).
    """
    path = Path(path)
    values = _as_int32(_single_channel(_decode(path, photometric=False), path), path)
    if _is_binary(values):
        return connected_components(values > 0, connectivity=1).astype(np.int32)
    return values


def read_foreground(path: str | Path) -> np.ndarray:
    """H x W bool, True where a mask file is non-zero: one object per file, as DSB2018 stores its nuclei."""
    path = Path(path)
    return _single_channel(_decode(path, photometric=False), path) != 0


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header alone (nothing is decoded)."""
    return _guarded(Path(path), _header_size)


def _header_size(path: Path) -> tuple[int, int]:
    if _is_tiff(path):
        with tifffile.TiffFile(path) as tif:
            page = _first_page(tif, path)
            return int(page.imagelength), int(page.imagewidth)
    with _open_pil(path) as im:
        return int(im.height), int(im.width)


def _decode(path: Path, *, photometric: bool) -> np.ndarray:
    """Pixels as the file stores them (after the size check): (H, W) or (H, W, C), native dtype."""
    return _guarded(path, lambda p: (_decode_tiff if _is_tiff(p) else _decode_pil)(p, photometric))


def _guarded(path: Path, read: Callable[[Path], T]) -> T:
    """``read(path)`` with every failure turned into a CdclError naming ``path``."""
    _check_file(path)
    try:
        return read(path)
    except CdclError:
        raise
    except MemoryError:
        raise CdclError("not enough memory to decode this image", path) from None
    except Exception as exc:  # decoders raise many exception types; each means "not a readable image"
        detail = str(exc).strip()
        raise CdclError(f"not a readable image ({type(exc).__name__}{': ' + detail if detail else ''})", path) from None


def _open_pil(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise CdclError(f"image declares too many pixels, refused as a decompression bomb ({exc})", path) from None


def _decode_pil(path: Path, photometric: bool) -> np.ndarray:
    with _open_pil(path) as im:
        _check_pixels(im.height, im.width, path)
        if im.mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        target = _PIL_TO_RGB.get(im.mode)
        if target and (photometric or im.mode not in ("P", "PA")):
            im = im.convert(target)
        return np.asarray(im)


def _decode_tiff(path: Path, photometric: bool) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = _first_page(tif, path)
        _check_pixels(page.imagelength, page.imagewidth, path)
        pixels = page.asarray()
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and pixels.ndim == 3:
            pixels = np.moveaxis(pixels, 0, -1)
        if photometric and page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            pixels = (page.colormap.T[pixels] >> 8).astype(np.uint8)  # TIFF colormaps are 16-bit
        elif photometric and page.photometric == tifffile.PHOTOMETRIC.MINISWHITE and pixels.dtype.kind == "u":
            pixels = np.iinfo(pixels.dtype).max - pixels
        return pixels


def _first_page(tif: tifffile.TiffFile, path: Path) -> tifffile.TiffPage:
    if len(tif.pages) == 0:
        raise CdclError("TIFF file has no readable image (truncated?)", path)
    return tif.pages.first


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CdclError("file not found", path) from None
    except OSError as exc:
        raise CdclError(f"cannot read file ({exc.strerror or exc})", path) from None
    if not path.is_file():
        raise CdclError("not a file", path)
    if size == 0:
        raise CdclError("empty file (0 bytes)", path)


def _check_pixels(height: int, width: int, path: Path) -> None:
    limit = max_image_pixels()
    if height * width > limit:
        raise CdclError(
            f"image declares {width} x {height} = {height * width} pixels, over the limit of {limit} "
            "(refused as a possible decompression bomb; raise CDCL_MAX_IMAGE_PIXELS if the file is genuine)",
            path,
        )


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _single_channel(values: np.ndarray, path: Path) -> np.ndarray:
    if values.ndim == 3 and values.shape[2] in (2, 4):  # drop alpha
        values = values[:, :, : values.shape[2] - 1]
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    if values.ndim == 3:
        if not (values == values[:, :, :1]).all():
            raise CdclError("colour mask: channels differ (expected one channel of instance ids)", path)
        values = values[:, :, 0]
    if values.ndim != 2:
        raise CdclError(f"mask has unsupported shape {values.shape}", path)
    return values


def _as_int32(values: np.ndarray, path: Path) -> np.ndarray:
    if values.dtype == bool or (values.dtype.kind == "u" and values.dtype.itemsize <= 2):
        return values.astype(np.int32)  # cannot be negative or overflow: skip the scans below
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise CdclError("float mask with non-integral values (expected integer instance ids)", path)
    elif values.dtype.kind not in "ui":
        raise CdclError(f"unsupported mask type {values.dtype}", path)
    if values.size and values.min() < 0:
        raise CdclError(f"mask has negative values (min {values.min()})", path)
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise CdclError(f"mask values exceed the int32 range (max {values.max()})", path)
    return values.astype(np.int32)


def _is_binary(values: np.ndarray) -> bool:
    """True when every non-zero pixel has one and the same value (a foreground mask, not instance ids)."""
    top = values.max(initial=0)
    return bool(top > 0 and np.count_nonzero(values) == np.count_nonzero(values == top))
