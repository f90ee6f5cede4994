"""``cdcl predict``: nuclei of image files and folders -> label maps, GeoJSON, CSV and overlays.

Folders are read non-recursively in sorted order; files without an image suffix inside a folder are skipped
with a warning, while an image that cannot be read is an error (a silently missing result is worse than a
stop). Images are predicted at their own pixels (tiles carry no reliable microns-per-pixel) unless ``--mpp``
gives theirs or asks for an estimate (``cdcl.inference.resolution``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cdcl.data.images import IMAGE_SUFFIXES, read_image
from cdcl.errors import CdclError
from cdcl.inference.predictor import Predictor, load_predictor
from cdcl.inference.resolution import check_request, log_estimates, predict_at
from cdcl.instances.export import nuclei_polygons, nuclei_table, write_csv, write_geojson, write_label_map
from cdcl.io import collect_inputs, ensure_writable_dir, save_png
from cdcl.viz import overlay_contours

log = logging.getLogger(__name__)

FORMATS = ("labels", "labels-tiff", "geojson", "csv", "overlay")
OVERLAY_COLOR = (0, 255, 0)


def parse_formats(text: str) -> list[str]:
    """The requested output formats, in a stable order; unknown names are a user error listing the valid ones."""
    wanted = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(wanted - set(FORMATS))
    if unknown or not wanted:
        raise CdclError(f"unknown --formats {','.join(unknown) or '(empty)'}; choose from {','.join(FORMATS)}")
    return [name for name in FORMATS if name in wanted]


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray, formats: list[str]) -> int:
    """Write the chosen files for one image; returns its number of nuclei."""
    rows = nuclei_table(labels, image)
    if "labels" in formats:
        write_label_map(out_dir / f"{stem}_labels.png", labels)
    if "labels-tiff" in formats:
        write_label_map(out_dir / f"{stem}_labels.tif", labels)
    if "geojson" in formats:
        write_geojson(out_dir / f"{stem}.geojson", nuclei_polygons(labels), rows)
    if "csv" in formats:
        write_csv(out_dir / f"{stem}_nuclei.csv", rows)
    if "overlay" in formats:
        save_png(out_dir / f"{stem}_overlay.png", overlay_contours(image, [(labels, OVERLAY_COLOR)]))
    return len(rows)


def predict_files(
    predictor: Predictor, images: list[Path], out_dir: Path, formats: list[str], mpp: float | str | None = None
) -> int:
    """Predict and export every image (``mpp``: see :func:`cdcl.inference.resolution.predict_at`); returns the
    total number of nuclei."""
    total, scales = 0, []
    for path in tqdm(images, desc="predict", unit="image", disable=None):
        image = read_image(path)
        labels, scale = predict_at(predictor, image, mpp, path.name)
        scales.append(scale)
        total += write_outputs(out_dir, path.stem, image, labels, formats)
    log_estimates(predictor, mpp, scales)
    return total


def run(args: argparse.Namespace) -> int:
    formats = parse_formats(args.formats)
    images = collect_inputs(args.inputs, IMAGE_SUFFIXES, "images")
    out_dir = ensure_writable_dir(args.out)
    predictor = load_predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, tta=args.tta)
    check_request(predictor, args.mpp, args.checkpoint)
    total = predict_files(predictor, images, out_dir, formats, args.mpp)
    log.info("%d image(s), %d nuclei -> %s", len(images), total, out_dir)
    return 0
