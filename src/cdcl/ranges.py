"""Plausible ranges of the values users give, checked once where they enter (CLI options, slide metadata)."""

from __future__ import annotations

from cdcl.errors import CdclError

PLAUSIBLE_MPP = (0.01, 50.0)  # microns per pixel: 1000x to 0.2x objectives; outside, the metadata is wrong
RESIDUAL_TOLERANCE = 0.10  # an image within 10% of the model's resolution is used without resizing
MAX_UPSAMPLING = 4  # an image needing more enlargement to reach the model's resolution holds too little detail


def plausible_mpp(value: float) -> bool:
    """Whether ``value`` microns per pixel is a resolution a scanner or camera could have (False for NaN)."""
    return PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def check_mpp(value: float, option: str) -> float:
    """``value`` when plausible; else a CdclError naming ``option`` (``--mpp``, ``--tile-mpp``) and the range."""
    if not plausible_mpp(value):
        raise CdclError(
            f"{option} must be between {PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]} microns per pixel, got {value}"
        )
    return value
