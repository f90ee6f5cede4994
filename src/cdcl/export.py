"""Nucleus exports shared by ``cdcl predict`` and ``cdcl predict-wsi``: measurements, polygons, files.

Coordinates follow the GeoJSON/QuPath convention: pixel (row r, column c) covers ``[c, c + 1) x [r, r + 1)``, so
its centre is ``(c + 0.5, r + 0.5)``. ``offset`` (x, y) and ``scale`` map the label map's pixels to level-0
pixels of a slide (``scale`` = level-0 pixels per label-map pixel); lengths and areas are in level-0 pixels too.
Writers stream their rows, so a slide's millions of nuclei never sit in memory at once, and every file is
written atomically.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours, regionprops_table

from cdcl.errors import CdclError
from cdcl.io import atomic_path

NUCLEUS_COLUMNS = (
    "id", "centroid_x", "centroid_y", "area", "perimeter", "eccentricity", "mean_intensity", "mean_r", "mean_g", "mean_b",
)
NUCLEUS_COLOR = (220, 40, 40)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as Pillow's "L" conversion
_UUID_NAMESPACE = uuid.UUID("0b6f5b8e-3c3e-4f5a-9d0e-6c1d2c7a4e11")  # stable feature ids: same input, same file

Ring = list[list[float]]


def nuclei_table(labels: np.ndarray, image: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0) -> list[dict[str, Any]]:
    """One row per nucleus (columns ``NUCLEUS_COLUMNS``): centroid in level-0 px, area (px²) and perimeter (px)
    in level-0 px, eccentricity, and the mean grey (``mean_intensity``) and RGB values of its pixels (0-255)."""
    props = regionprops_table(
        labels, intensity_image=image, properties=("label", "centroid", "area", "perimeter", "eccentricity", "intensity_mean")
    )
    rgb = [props[f"intensity_mean-{c}"] for c in range(3)]
    columns = {
        "id": props["label"].astype(int),
        "centroid_x": (props["centroid-1"] + 0.5) * scale + offset[0],
        "centroid_y": (props["centroid-0"] + 0.5) * scale + offset[1],
        "area": props["area"] * scale**2,
        "perimeter": props["perimeter"] * scale,
        "eccentricity": props["eccentricity"],
        "mean_intensity": sum(w * c for w, c in zip(_LUMA, rgb)),
        "mean_r": rgb[0],
        "mean_g": rgb[1],
        "mean_b": rgb[2],
    }
    values = [columns["id"].tolist()] + [np.round(columns[k], 3).tolist() for k in NUCLEUS_COLUMNS[1:]]
    return [dict(zip(NUCLEUS_COLUMNS, row)) for row in zip(*values)]


def nuclei_polygons(labels: np.ndarray, offset: tuple[float, float] = (0, 0), scale: float = 1.0) -> list[tuple[int, Ring]]:
    """``(id, ring)`` per nucleus: its outer boundary as a closed ring of (x, y) level-0 coordinates.

    The ring is the 0.5 iso-line of the nucleus mask (marching squares on a zero-padded crop), with the
    nucleus 8-connected so a diagonal pixel bridge stays one ring; collinear vertices are dropped. Holes are
    ignored and, if a label has several separate parts, only the largest outline is kept.
    """
    result = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        nucleus_id = index + 1
        mask = np.pad(labels[box] == nucleus_id, 1).astype(np.float32)
        ring = max(find_contours(mask, 0.5, fully_connected="high"), key=len)
        ring = approximate_polygon(ring, tolerance=0)
        rows = ring[:, 0] + box[0].start - 1 + 0.5
        cols = ring[:, 1] + box[1].start - 1 + 0.5
        coords = np.stack([cols * scale + offset[0], rows * scale + offset[1]], axis=1)
        result.append((nucleus_id, np.round(coords, 3).tolist()))
    return result


def nucleus_feature(ring: Ring, measurements: dict[str, Any], source: str, classification: str = "Nucleus") -> dict[str, Any]:
    """A QuPath detection Feature; its id is a UUID derived from ``source`` and the nucleus id (reproducible)."""
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{source}#{measurements['id']}")),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": {"name": classification, "color": list(NUCLEUS_COLOR)},
            "measurements": measurements,
        },
    }


def write_feature_collection(path: str | Path, features: Iterable[dict[str, Any]]) -> int:
    """Stream features into a GeoJSON FeatureCollection (one feature per line); returns how many."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for count, feature in enumerate(features, 1):
            fh.write(("\n" if count == 1 else ",\n") + json.dumps(feature, separators=(",", ":")))
        fh.write("\n]}\n")
    return count


def write_geojson(path: str | Path, polygons: list[tuple[int, Ring]], measurements: list[dict[str, Any]], classification: str = "Nucleus") -> None:
    """QuPath-compatible GeoJSON of nuclei: each polygon with the measurement row of the same id."""
    rows = {row["id"]: row for row in measurements}
    source = Path(path).stem
    write_feature_collection(path, (nucleus_feature(ring, rows[i], source, classification) for i, ring in polygons))


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: tuple[str, ...] = NUCLEUS_COLUMNS) -> int:
    """Stream rows into a CSV with a header (written even without rows); returns how many rows."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for count, row in enumerate(rows, 1):
            writer.writerow(row)
    return count


def write_label_map(path: str | Path, labels: np.ndarray) -> None:
    """Instance labels as a 16-bit PNG (``.png``) or a 32-bit zlib TIFF (``.tif``/``.tiff``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if labels.size and labels.max() > np.iinfo(np.uint16).max:
            raise CdclError(f"{int(labels.max())} nuclei do not fit a 16-bit PNG; write the labels-tiff format instead", path)
        with atomic_path(path) as tmp:
            Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")
    elif suffix in (".tif", ".tiff"):
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, labels.astype(np.uint32), compression="zlib")
    else:
        raise ValueError(f"label maps are written as .png or .tif, not {suffix!r}")


def iter_rows(features: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The CSV rows of GeoJSON features (their measurements), for writing both files from one stream."""
    return (feature["properties"]["measurements"] for feature in features)
