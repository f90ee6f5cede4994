"""Nucleus exports: measurements, polygons (valid, right area, level-0 coordinates), GeoJSON, CSV, label maps."""

from __future__ import annotations

import csv
import json

import jsonschema
import numpy as np
import pytest
import shapely.geometry
import tifffile
from PIL import Image
from skimage.draw import disk, ellipse

from cdcl.errors import CdclError
from cdcl.export import (
    NUCLEUS_COLUMNS,
    nuclei_polygons,
    nuclei_table,
    write_csv,
    write_geojson,
    write_label_map,
)

# The parts of RFC 7946 a QuPath import relies on, for polygon features.
POSITION = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
RING = {"type": "array", "items": POSITION, "minItems": 4}
GEOJSON_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string", "format": "uuid"},
                    "geometry": {
                        "type": "object",
                        "required": ["type", "coordinates"],
                        "properties": {"type": {"const": "Polygon"}, "coordinates": {"type": "array", "items": RING, "minItems": 1}},
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification", "measurements"],
                        "properties": {
                            "objectType": {"const": "detection"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {"name": {"type": "string"}, "color": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}},
                            },
                            "measurements": {"type": "object", "additionalProperties": {"type": "number"}},
                        },
                    },
                },
            },
        },
    },
}


def check_geojson(path) -> dict:
    """Schema-valid, closed rings, every polygon valid by shapely; returns the parsed collection."""
    data = json.loads(path.read_text())
    jsonschema.validate(data, GEOJSON_SCHEMA, format_checker=jsonschema.FormatChecker())
    for feature in data["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert shapely.geometry.shape(feature["geometry"]).is_valid
    assert len({f["id"] for f in data["features"]}) == len(data["features"])
    return data


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    """Labels with non-contiguous ids, a disc, an ellipse, a single pixel and a diagonal pixel pair, each
    painted a known colour."""
    labels = np.zeros((120, 150), np.int32)
    image = np.full((120, 150, 3), 250, np.uint8)
    labels[disk((40, 50), 15)] = 3
    image[disk((40, 50), 15)] = (100, 50, 150)
    labels[ellipse(85, 100, 10, 25)] = 8
    image[ellipse(85, 100, 10, 25)] = (60, 60, 60)
    labels[5, 140] = 11
    labels[[100, 101], [10, 11]] = 12
    return labels, image


def test_nuclei_table_measures_each_nucleus(scene) -> None:
    labels, image = scene
    rows = nuclei_table(labels, image)
    assert [r["id"] for r in rows] == [3, 8, 11, 12]
    assert all(tuple(r) == NUCLEUS_COLUMNS for r in rows)
    disc, ell, dot = rows[0], rows[1], rows[2]
    assert disc["area"] == (labels == 3).sum()
    assert (disc["centroid_x"], disc["centroid_y"]) == (50.5, 40.5)  # pixel centres at +0.5
    assert disc["eccentricity"] < 0.1 and ell["eccentricity"] > 0.9
    assert (disc["mean_r"], disc["mean_g"], disc["mean_b"]) == (100, 50, 150)
    assert disc["mean_intensity"] == pytest.approx(0.299 * 100 + 0.587 * 50 + 0.114 * 150, abs=1e-3)
    assert disc["perimeter"] == pytest.approx(2 * np.pi * 15, rel=0.05)
    assert (dot["centroid_x"], dot["centroid_y"], dot["area"]) == (140.5, 5.5, 1)
    shifted = nuclei_table(labels, image, offset=(1000, 2000), scale=2)[0]
    assert (shifted["centroid_x"], shifted["centroid_y"]) == (1000 + 2 * 50.5, 2000 + 2 * 40.5)
    assert shifted["area"] == 4 * disc["area"]
    assert nuclei_table(np.zeros((10, 10), np.int32), np.zeros((10, 10, 3), np.uint8)) == []


def test_polygons_are_valid_closed_rings_with_the_pixel_area(scene) -> None:
    labels, _ = scene
    polygons = nuclei_polygons(labels)
    assert [i for i, _ in polygons] == [3, 8, 11, 12]
    assert len(polygons[2][1]) == 5  # a single pixel: a diamond, no collinear vertices kept
    for nucleus_id, ring in polygons:
        shape = shapely.geometry.Polygon(ring)
        area = (labels == nucleus_id).sum()
        assert ring[0] == ring[-1] and shape.is_valid
        # the outline runs through the boundary pixels' edge midpoints: at most half a pixel per corner lost
        assert area - 0.5 * max(4, np.sqrt(area)) <= shape.area <= area
    disc = shapely.geometry.Polygon(polygons[0][1])
    assert (disc.centroid.x, disc.centroid.y) == pytest.approx((50.5, 40.5), abs=1e-6)
    assert shapely.geometry.Polygon(polygons[3][1]).area == pytest.approx(1.5)  # the diagonal pair stays one ring
    scaled = shapely.geometry.Polygon(nuclei_polygons(labels, offset=(1000, 2000), scale=2)[0][1])
    assert scaled.area == pytest.approx(4 * disc.area)
    assert (scaled.centroid.x, scaled.centroid.y) == pytest.approx((1000 + 2 * 50.5, 2000 + 2 * 40.5))


def test_geojson_is_valid_and_carries_measurements(tmp_path, scene) -> None:
    labels, image = scene
    rows = nuclei_table(labels, image)
    write_geojson(tmp_path / "a.geojson", nuclei_polygons(labels), rows)
    data = check_geojson(tmp_path / "a.geojson")
    assert len(data["features"]) == 4
    feature = data["features"][0]
    assert feature["properties"]["classification"]["name"] == "Nucleus"
    assert feature["properties"]["measurements"] == rows[0]
    first = (tmp_path / "a.geojson").read_text()
    write_geojson(tmp_path / "a.geojson", nuclei_polygons(labels), rows)
    assert (tmp_path / "a.geojson").read_text() == first  # reproducible, ids included
    write_geojson(tmp_path / "empty.geojson", [], [])
    assert check_geojson(tmp_path / "empty.geojson")["features"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson", "empty.geojson"]  # no temp files


def test_csv_has_a_header_and_one_row_per_nucleus(tmp_path, scene) -> None:
    labels, image = scene
    rows = nuclei_table(labels, image)
    write_csv(tmp_path / "n.csv", rows)
    with open(tmp_path / "n.csv", newline="") as fh:
        read = list(csv.DictReader(fh))
    assert tuple(read[0]) == NUCLEUS_COLUMNS
    assert [int(r["id"]) for r in read] == [3, 8, 11, 12]
    assert float(read[0]["area"]) == rows[0]["area"]
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text().strip() == ",".join(NUCLEUS_COLUMNS)


def test_label_maps_round_trip_as_16_bit_png_and_32_bit_tiff(tmp_path, scene) -> None:
    labels, _ = scene
    write_label_map(tmp_path / "l.png", labels)
    png = np.asarray(Image.open(tmp_path / "l.png"))
    assert png.dtype == np.uint16
    np.testing.assert_array_equal(png, labels)
    many = labels.copy()
    many[labels == 8] = 70000
    with pytest.raises(CdclError, match="labels-tiff"):
        write_label_map(tmp_path / "many.png", many)
    assert not (tmp_path / "many.png").exists()
    write_label_map(tmp_path / "many.tif", many)
    tif = tifffile.imread(tmp_path / "many.tif")
    assert tif.dtype == np.uint32
    np.testing.assert_array_equal(tif, many)


def test_table_matches_scikit_image_regionprops(shared_data) -> None:
    """The moment-based measurements equal regionprops' on a real MoNuSeg label map (non-contiguous ids too)."""
    from skimage.measure import regionprops_table

    stem = "TCGA-18-5592-01Z-00-DX1"
    labels = np.asarray(Image.open(shared_data / "monuseg" / "train" / "masks" / f"{stem}.png")).astype(np.int32)[:400, :400] * 3
    image = np.asarray(Image.open(shared_data / "monuseg" / "train" / "images" / f"{stem}.tif").convert("RGB"))[:400, :400]
    rows = nuclei_table(labels, image)
    ref = regionprops_table(labels, image, properties=("label", "centroid", "area", "perimeter", "eccentricity", "intensity_mean"))
    assert len(rows) == len(ref["label"]) > 50
    np.testing.assert_array_equal([r["id"] for r in rows], ref["label"])
    for column, key in [("centroid_x", "centroid-1"), ("centroid_y", "centroid-0")]:
        np.testing.assert_allclose([r[column] for r in rows], ref[key] + 0.5, atol=1e-3)
    for column, key in [("area", "area"), ("perimeter", "perimeter"), ("eccentricity", "eccentricity"), ("mean_r", "intensity_mean-0"), ("mean_b", "intensity_mean-2")]:
        np.testing.assert_allclose([r[column] for r in rows], ref[key], atol=1e-3)
