"""Aperio ImageScope XML annotations: safe parsing and the rasterisation rule MoNuSeg masks were made with.

The rule (see ``../shared/data/README.md``) follows MATLAB ``poly2mask``, which the challenge used: pixel
(row r, column c) is inside a polygon when the point (x, y) = (c + 1, r + 1) passes the even-odd crossing test
with half-open edges. MoNuSeg vertices are integers, so many pixel centres lie exactly on edges and the edge rule
decides whether a boundary ring belongs to the nucleus; ``skimage.draw.polygon`` and matplotlib differ from the
published masks by that ring, which is why the test is written out here.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from cdcl.errors import CdclError

__all__ = ["polygon_mask", "rasterize_polygons", "read_aperio_xml"]


def read_aperio_xml(path: str | Path) -> list[np.ndarray]:
    """Polygons of every ``Region`` in an Aperio ImageScope XML file, each a (K, 2) float array of (x, y).

    Parsed with defusedxml and DTDs forbidden, so external entities (XXE) and entity expansion ("billion
    laughs") are refused before anything is expanded. A well-formed file with no regions gives an empty list.
    """
    path = Path(path)
    root = _parse_xml(path)
    if root.tag != "Annotations":
        raise CdclError(f"not an Aperio ImageScope XML file (root element <{root.tag}>, expected <Annotations>)", path)
    return [_region_vertices(region, index, path) for index, region in enumerate(root.iter("Region"), start=1)]


def _parse_xml(path: Path) -> ET.Element:
    try:
        if path.stat().st_size == 0:
            raise CdclError("empty XML file (0 bytes)", path)
        return SafeET.parse(path, forbid_dtd=True).getroot()
    except defusedxml.DefusedXmlException as exc:
        raise CdclError(f"refused XML with a DTD or entities (unsafe: {type(exc).__name__})", path) from None
    except ET.ParseError as exc:
        raise CdclError(f"malformed XML ({exc})", path) from None
    except OSError as exc:
        raise CdclError(f"cannot read XML file ({exc.strerror or exc})", path) from None


def _region_vertices(region: ET.Element, index: int, path: Path) -> np.ndarray:
    points = []
    for vertex in region.iter("Vertex"):
        try:
            points.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
        except (KeyError, ValueError):
            raise CdclError(f"Region {index}: a Vertex without numeric X and Y attributes", path) from None
    polygon = np.array(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(polygon).all():
        raise CdclError(f"Region {index}: non-finite vertex coordinates", path)
    return polygon


def rasterize_polygons(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance label map (int32, 0 = background) of ``polygons`` on an image of ``shape`` = (H, W).

    Polygons are numbered 1, 2, ... in order, skipping those with fewer than 3 vertices or no pixel of their
    own; where polygons overlap, the earlier one keeps the pixel.
    """
    labels = np.zeros(shape, dtype=np.int32)
    next_id = 1
    for polygon in polygons:
        window = polygon_mask(polygon, shape)
        if window is None:
            continue
        (r0, c0), inside = window
        target = labels[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]]
        own = inside & (target == 0)
        if own.any():
            target[own] = next_id
            next_id += 1
    return labels


def polygon_mask(polygon: np.ndarray, shape: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray] | None:
    """Pixels of one polygon inside an image of ``shape``, as ((row0, col0), boolean mask of its bounding box).

    None when the polygon has fewer than 3 vertices or its bounding box misses the image. Works row by row:
    the crossings of each pixel row with the edges, sorted, pair up into the column intervals that are inside.
    """
    polygon = np.asarray(polygon, dtype=np.float64)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
        return None
    height, width = shape
    # Pixel (r, c) is the point (c + 1, r + 1); rows whose y lies within the polygon's y range, columns likewise.
    r0, r1 = max(0, int(np.ceil(polygon[:, 1].min())) - 1), min(height, int(np.floor(polygon[:, 1].max())))
    c0, c1 = max(0, int(np.ceil(polygon[:, 0].min())) - 1), min(width, int(np.floor(polygon[:, 0].max())))
    if r0 >= r1 or c0 >= c1:
        return None
    crossings = _row_crossings(polygon, np.arange(r0, r1, dtype=np.float64) + 1.0)
    # Even-odd rule: x is inside when an odd number of crossings lie strictly right of it, i.e. when
    # x_(2k-1) <= x < x_(2k) for sorted crossings; for integer x = c + 1 that is
    # ceil(x_(2k-1)) - 1 <= c < ceil(x_(2k)) - 1: column intervals, filled with +1/-1 steps and a cumulative sum.
    columns = np.clip(np.ceil(crossings) - 1 - c0, 0, c1 - c0).astype(np.int64)
    n_rows, n_cols = r1 - r0, c1 - c0
    row_offset = (np.arange(n_rows) * (n_cols + 1))[:, None]
    size = n_rows * (n_cols + 1)
    steps = np.bincount((columns[:, 0::2] + row_offset).ravel(), minlength=size)
    steps -= np.bincount((columns[:, 1::2] + row_offset).ravel(), minlength=size)
    inside = np.cumsum(steps.reshape(n_rows, n_cols + 1)[:, :n_cols], axis=1) > 0
    return (r0, c0), inside


def _row_crossings(polygon: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Sorted x of each row's crossings with the polygon's edges (rows x even count; +inf pads rows)."""
    xi, yi = polygon[:, 0], polygon[:, 1]
    xj, yj = np.roll(xi, 1), np.roll(yi, 1)
    y = ys[:, None]
    # Half-open edges: an edge counts for row y when exactly one end lies strictly below y (larger y).
    straddles = (yi > y) != (yj > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = xi + (y - yi) * (xj - xi) / (yj - yi)
    x_cross = np.where(straddles, x_cross, np.inf)
    if x_cross.shape[1] % 2:  # every row has an even number of real crossings; pad so they pair up
        x_cross = np.concatenate([x_cross, np.full((len(ys), 1), np.inf)], axis=1)
    return np.sort(x_cross, axis=1)
