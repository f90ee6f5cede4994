"""Nucleus exports: measurements, polygons (valid, right area, level-0 coordinates), GeoJSON, CSV, label maps.

The whole-map perimeter and outline tracing are checked against scikit-image per region: ``regionprops`` and
``find_contours`` on each nucleus' padded crop (``cdcl.testing.exports``), on random label maps and a real mask."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import shapely.geometry
import tifffile
from PIL import Image
from skimage.draw import disk, ellipse
from skimage.filters import gaussian
from skimage.measure import regionprops, regionprops_table
from skimage.segmentation import watershed

from cdcl.data import read_image, read_label_image
from cdcl.errors import CdclError
from cdcl.instances import export, outlines
from cdcl.instances.export import (
    NUCLEUS_COLUMNS,
    label_perimeters,
    nuclei_polygons,
    nuclei_table,
    write_csv,
    write_geojson,
    write_label_map,
)
from cdcl.testing.exports import reference_polygons, reference_table

from helpers.geojson import check_geojson


# The parts of RFC 7946 a QuPath import relies on, for polygon features.
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

    stem = "TCGA-18-5592-01Z-00-DX1"
    labels = (
        np.asarray(Image.open(shared_data / "monuseg" / "train" / "masks" / f"{stem}.png")).astype(np.int32)[:400, :400]
        * 3
    )
    image = np.asarray(Image.open(shared_data / "monuseg" / "train" / "images" / f"{stem}.tif").convert("RGB"))[
        :400, :400
    ]
    rows = nuclei_table(labels, image)
    ref = regionprops_table(
        labels, image, properties=("label", "centroid", "area", "perimeter", "eccentricity", "intensity_mean")
    )
    assert len(rows) == len(ref["label"]) > 50
    np.testing.assert_array_equal([r["id"] for r in rows], ref["label"])
    for column, key in [("centroid_x", "centroid-1"), ("centroid_y", "centroid-0")]:
        np.testing.assert_allclose([r[column] for r in rows], ref[key] + 0.5, atol=1e-3)
    for column, key in [
        ("area", "area"),
        ("perimeter", "perimeter"),
        ("eccentricity", "eccentricity"),
        ("mean_r", "intensity_mean-0"),
        ("mean_b", "intensity_mean-2"),
    ]:
        np.testing.assert_allclose([r[column] for r in rows], ref[key], atol=1e-3)


def random_label_map(seed: int, shape: tuple[int, int] = (90, 110)) -> np.ndarray:
    """Touching blobs (a watershed of random markers) cut by the image edges, with non-consecutive ids, holes,
    one-pixel nuclei (some inside others), nuclei in two separate parts, a label surrounding another, a
    checkerboard patch, and nuclei that touch only at a corner."""
    rng = np.random.default_rng(seed)
    noise = gaussian(rng.random(shape), 3)
    foreground = noise > np.quantile(noise, 0.45)
    markers = np.zeros(shape, np.int32)
    points = rng.integers(0, shape, (40, 2))
    markers[points[:, 0], points[:, 1]] = np.arange(1, 41)
    blobs = watershed(-noise, markers, mask=foreground)
    ids = rng.choice(np.arange(2, 60000), 41, replace=False)
    ids[0] = 0
    ids[2] = ids[1]  # two separate nuclei sharing one id
    labels = ids[blobs]
    holes = rng.integers(0, shape, (15, 2))
    labels[holes[:, 0], holes[:, 1]] = 0
    labels[holes[:5, 0], np.minimum(holes[:5, 1] + 1, shape[1] - 1)] = 0  # two-pixel holes
    dots = rng.integers(0, shape, (12, 2))
    labels[dots[:, 0], dots[:, 1]] = rng.choice(np.arange(60000, 70000), 12, replace=False)
    labels[5:14, 5:14], labels[7:12, 7:12], labels[9, 9] = 65001, 0, 65002  # a ring around a one-pixel nucleus
    r, c = rng.integers(20, np.array(shape) - 10)
    checker = (np.indices((6, 6)).sum(axis=0) % 2).astype(bool)
    labels[r : r + 6, c : c + 6] = np.where(checker, 65003, np.where(rng.random((6, 6)) < 0.5, 65004, 0))
    labels[-2:, -2:] = [[65005, 0], [0, 65006]]  # touching at a corner only, in the image corner
    return labels


def scattered_label_map(seed: int) -> np.ndarray:
    """Pixel noise of three ids and background: saddle cells everywhere, nuclei in many parts, several of them
    with the longest outline."""
    rng = np.random.default_rng(seed)
    return np.array([0, 0, 3, 17, 400])[rng.integers(0, 5, (24, 31))]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_perimeters_equal_regionprops_for_every_label(seed) -> None:
    for labels in (random_label_map(seed), scattered_label_map(seed), random_label_map(seed).astype(np.uint16)):
        ids, perimeter = label_perimeters(labels)
        regions = regionprops(labels)
        assert len(regions) >= 3
        np.testing.assert_array_equal(ids, [r.label for r in regions])
        np.testing.assert_allclose(perimeter, [r.perimeter for r in regions], rtol=0, atol=1e-9)
    ids, perimeter = label_perimeters(
        np.array([[5, 5, 0, 9, 9, 9], [5, 5, 0, 9, 9, 9], [0, 0, 0, 9, 9, 9], [2, 0, 0, 0, 0, 0]])
    )
    assert ids.tolist() == [2, 5, 9] and perimeter.tolist() == [0.0, 4.0, 8.0]  # skimage's: a dot, 2x2 and 3x3 squares
    assert [len(x) for x in label_perimeters(np.zeros((3, 4), np.int32))] == [0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_polygons_equal_the_per_nucleus_find_contours_reference(seed) -> None:
    for labels in (random_label_map(seed), scattered_label_map(seed)):
        polygons = nuclei_polygons(labels, offset=(12.5, -3), scale=0.75)
        assert len(polygons) >= 3
        assert polygons == reference_polygons(labels, offset=(12.5, -3), scale=0.75)
    labels = random_label_map(seed)
    assert nuclei_polygons(labels) == reference_polygons(labels)


def test_polygons_of_maps_too_large_for_packed_sort_keys(monkeypatch) -> None:
    """Past 2**63 the packed (key, index) sort would overflow: argsort takes over, same outlines."""
    monkeypatch.setattr(outlines, "_KEY_BITS", 20)
    labels = random_label_map(7)
    assert nuclei_polygons(labels) == reference_polygons(labels)


def test_polygons_of_touching_nested_and_split_nuclei() -> None:
    labels = np.zeros((12, 14), np.int32)
    labels[1:10, 1:10] = 4  # a frame around nucleus 9
    labels[3:8, 3:8] = 9
    labels[0, 11:14], labels[11, 0] = 4, 7  # second parts, at the image edges
    labels[11, 11], labels[10, 12] = 7, 7  # a diagonal pair: one ring, longer than 7's other part
    labels[10, 10] = 2  # touches 4 and 7 at corners only
    labels[11, 4], labels[8, 12] = 5, 5  # two equal parts: the first in raster order is kept
    polygons = nuclei_polygons(labels)
    assert polygons == reference_polygons(labels)
    assert [i for i, _ in polygons] == [2, 4, 5, 7, 9]
    assert dict(polygons)[5] == [[12.5, 9.0], [12.0, 8.5], [12.5, 8.0], [13.0, 8.5], [12.5, 9.0]]  # pixel (8, 12)
    assert shapely.geometry.Polygon(dict(polygons)[4]).area == 81 - 4 * 0.125  # the frame's outside, corners cut
    assert shapely.geometry.Polygon(dict(polygons)[7]).area == 1.5
    assert nuclei_polygons(np.zeros((4, 4), np.int32)) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_table_equals_the_per_pixel_regionprops_reference(seed) -> None:
    rng = np.random.default_rng(seed)
    for labels in (random_label_map(seed), scattered_label_map(seed)):
        image = rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
        rows = nuclei_table(labels, image, offset=(12.5, -3), scale=0.75)
        assert len(rows) >= 3
        assert rows == reference_table(labels, image, offset=(12.5, -3), scale=0.75)
    labels = random_label_map(seed)
    image = rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    rows = nuclei_table(labels, image, scale=2)
    assert rows == reference_table(labels, image, scale=2)
    assert all(type(row["area"]) is int for row in rows)  # as before: integer areas stay integers in the files


def test_row_run_moments_equal_per_pixel_sums_exactly(shared_data) -> None:
    """Sums over row runs are the exact integers per-pixel sums are, so the table's floats stay the same."""
    real = read_label_image(shared_data / "monuseg" / "train" / "masks" / "TCGA-21-5784-01Z-00-DX1.png")
    for labels in (random_label_map(0), scattered_label_map(1), real):
        rr, cc = np.nonzero(labels)
        counts = np.bincount(labels[rr, cc])
        ids = np.flatnonzero(counts)  # labels[rr, cc] > 0

        def mean(values: np.ndarray) -> np.ndarray:
            return np.bincount(labels[rr, cc], values.astype(np.float64))[ids] / counts[ids]

        rows, cols = mean(rr), mean(cc)
        expected = (rows, cols, mean(rr * rr) - rows**2, mean(cc * cc) - cols**2, mean(rr * cc) - rows * cols)
        for got, want in zip(export._moments(labels, ids, counts[ids]), expected):
            np.testing.assert_array_equal(got, want)


def test_polygons_table_and_perimeters_match_the_references_on_a_real_mask(shared_data) -> None:
    labels = read_label_image(shared_data / "monuseg" / "train" / "masks" / "TCGA-21-5784-01Z-00-DX1.png")
    polygons = nuclei_polygons(labels, offset=(1000, 2000), scale=2)
    assert len(polygons) > 300
    assert polygons == reference_polygons(labels, offset=(1000, 2000), scale=2)
    image = read_image(shared_data / "monuseg" / "train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif")
    assert nuclei_table(labels, image, offset=(1000, 2000), scale=2) == reference_table(
        labels, image, offset=(1000, 2000), scale=2
    )
    ids, perimeter = label_perimeters(labels)
    regions = regionprops(labels)
    np.testing.assert_array_equal(ids, [r.label for r in regions])
    np.testing.assert_allclose(perimeter, [r.perimeter for r in regions], rtol=0, atol=1e-9)
