"""Sliding-window inference on arrays of any size: Gaussian-blended windows, stitched on the device or the CPU.

Windows overlap and are blended with a Gaussian weight so that every pixel's probability comes mostly from
windows where it sits near the centre (where the network sees the most context). Images up to 4096 x 4096 px
(a whole-slide tile, a dataset image) are blended on the accelerator and copied back once; larger ones in CPU
memory (MONAI's ``sw_device`` idea), so the accelerator only ever holds one batch of windows whatever the
image size. Inference never imports training code: the model comes from ``cdcl.inference.predictor``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from cdcl.inference.tta import augmented_maps
from cdcl.instances.representations import MAP_CHANNELS, representation_of
from cdcl.runtime import amp_dtype
from cdcl.windows import window_starts

MULTIPLE = 32  # the encoder's total stride: network inputs must be multiples of it
# Larger (padded) images are blended in CPU memory: ~130 MB of device memory per prediction map (a learned
# instance representation has two).
STITCH_ON_DEVICE_PIXELS = 4096 * 4096
CUDA_WINDOWS_PER_BATCH = 16  # fewest windows per forward pass on CUDA when none are asked for (windows_per_batch)


def windows_per_batch(requested: int | None, configured: int, device: torch.device) -> int:
    """Windows per forward pass: ``requested`` (``--batch-size``) when given, else the config's
    ``infer.batch_size``, raised to 16 on CUDA. There the host's time to launch a pass, not the device's to run
    it, sets the pace: 16 windows ran predict-wsi 1.2-1.5x faster than the cpu-small preset's 4 on an H200
    (``benchmarks/results/wsi_memory_h200_compare.md``)."""
    if requested is not None:
        return requested
    return max(configured, CUDA_WINDOWS_PER_BATCH) if device.type == "cuda" else configured


def gaussian_weight(window: int | tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """A ``window x window`` (or ``(h, w)``) float32 blending weight: a Gaussian of sigma ``sigma_scale`` times
    the side, 1 in the centre. At 0.125 a window corner still weighs exp(-16) ~ 1e-7, far from float32
    underflow, so every covered pixel has a positive total weight, and a pixel near one window's edge takes
    its value almost entirely from a window where it sits nearer the centre."""
    height, width = (window, window) if isinstance(window, int) else window
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (sigma_scale * n)) ** 2) for n in (height, width)]
    return np.outer(*axes).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _weight_on(device: torch.device, height: int, width: int) -> torch.Tensor:
    """:func:`gaussian_weight` on ``device``, made once: copying it from pageable host memory for every image
    would stall the host until the device finished all the work queued before it."""
    return torch.from_numpy(gaussian_weight((height, width))).to(device)


def _upload(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``pixels`` on ``device``. To CUDA through pinned memory and without waiting: from pageable memory CUDA
    first waits for everything queued on the stream (the previous tile's forward pass, which the caller queued
    ahead on purpose). The pinned buffer is not reused before the copy has run (PyTorch's host allocator)."""
    if device.type != "cuda":
        return pixels.to(device)
    return pixels.pin_memory().to(device, non_blocking=True)


def _round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def window_layout(height: int, width: int, window: int, overlap: float) -> tuple[int, int, list[tuple[int, int]]]:
    """``(win_h, win_w, corners)``: the window size (``window``, or a shorter image side rounded up to a
    multiple of 32) and the top-left corners of the windows covering the image once padded to that size."""
    win_h, win_w = min(window, _round_up(height)), min(window, _round_up(width))
    rows = window_starts(max(height, win_h), win_h, overlap)
    cols = window_starts(max(width, win_w), win_w, overlap)
    return win_h, win_w, [(y, x) for y in rows for x in cols]


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reflect-pad an image at the bottom/right to at least ``height x width`` (reflection keeps the border
    statistics closer to tissue than zeros would)."""
    if image.shape[0] >= height and image.shape[1] >= width:
        return image
    return np.pad(
        image, ((0, max(0, height - image.shape[0])), (0, max(0, width - image.shape[1])), (0, 0)), mode="reflect"
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported, else fp16); nothing on CPU or without ``amp``."""
    dtype = amp_dtype(device) if amp else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class PendingProbability:
    """A probability map under way on the accelerator: :meth:`result` waits for it. Until then the caller's
    thread is free (to receive the next tile, hand the last one to post-processing) while the device works."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._host, self._done = host, done

    def result(self) -> np.ndarray:
        if self._done is not None:
            self._done.synchronize()
        return self._host.numpy()


def start_probability(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    window: int,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    amp: bool = False,
    stain: Callable[[np.ndarray], np.ndarray] | None = None,
    tta: str = "none",
) -> PendingProbability:
    """Queue the prediction maps of ``image`` on the device and return without waiting for it: the HxW
    foreground probability of a binary model, or the 2xHxW foreground probability and marker strength of a
    learned instance representation (``cdcl.instances.representations.prediction_maps``).

    Images of any size are accepted: a side shorter than ``window`` gets one window of that side rounded up to a
    multiple of 32, and the image is reflect-padded to fill it. ``device`` defaults to the model's; ``amp``
    enables autocast on CUDA only; ``tta`` averages each window's maps over flips and rotations
    (``cdcl.inference.tta``; ``none``: one pass). ``stain`` recolours the image first (``cdcl.data.stain``: the
    checkpoint's stain normalisation); this is the one place every prediction passes through.

    Windows are cut from the image on the device and blended there when the padded image has at most
    ``STITCH_ON_DEVICE_PIXELS`` pixels, so a CUDA run synchronises once per image rather than once per batch;
    larger images are stitched in CPU memory, batch by batch, so the device holds one batch whatever the size.
    Either way the arithmetic is the same float32 operations in the same order, so the result is too.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if window <= 0 or window % MULTIPLE:
        raise ValueError(f"window must be a positive multiple of {MULTIPLE}, got {window}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if stain is not None:
        image = stain(image)
    height, width = image.shape[:2]
    win_h, win_w, corners = window_layout(height, width, window, overlap)
    padded = pad_to(image, win_h, win_w)
    device = torch.device(device) if device is not None else _model_device(model)
    stitch = device if padded.shape[0] * padded.shape[1] <= STITCH_ON_DEVICE_PIXELS else torch.device("cpu")
    pixels = _upload(
        torch.from_numpy(padded if padded.flags.writeable else padded.copy()), stitch
    )  # torch wants writable
    weight, weight_stitch = _weight_on(device, win_h, win_w), _weight_on(stitch, win_h, win_w)
    representation = representation_of(model)
    channels = () if representation == "binary" else (MAP_CHANNELS[representation],)
    acc = torch.zeros((*channels, *padded.shape[:2]), dtype=torch.float32, device=stitch)
    norm = torch.zeros(padded.shape[:2], dtype=torch.float32, device=stitch)
    with torch.inference_mode(), autocast(device, amp):
        for batch in _batches(corners, max(1, batch_size)):
            crops = torch.stack([pixels[y : y + win_h, x : x + win_w] for y, x in batch]).to(device, non_blocking=True)
            maps = augmented_maps(model, crops.permute(0, 3, 1, 2).float().div_(255.0), representation, tta)
            weighted = (maps * weight).to(stitch)
            for (y, x), prob in zip(batch, weighted):
                acc[..., y : y + win_h, x : x + win_w] += prob
                norm[y : y + win_h, x : x + win_w] += weight_stitch
        prob = (acc / norm)[..., :height, :width]
    if stitch.type != "cuda":
        return PendingProbability(prob)
    host = torch.empty(prob.shape, dtype=prob.dtype, pin_memory=True)
    host.copy_(prob, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return PendingProbability(host, done)


def sliding_window_probability(model: torch.nn.Module, image: np.ndarray, **options: Any) -> np.ndarray:
    """Prediction maps of an HxWx3 uint8 image as float32: HxW foreground probability (binary model) or 2xHxW
    (foreground probability, marker strength); the result of :func:`start_probability` (same keyword
    ``options``), waited for."""
    return start_probability(model, image, **options).result()


def foreground_of(maps: np.ndarray) -> np.ndarray:
    """The HxW foreground probability of prediction maps of either shape."""
    return maps if maps.ndim == 2 else maps[0]
