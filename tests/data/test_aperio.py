"""Aperio XML parsing (safe against hostile XML) and the MoNuSeg rasterisation rule, down to the pixel."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdcl.data.aperio import rasterize_polygons, read_aperio_xml
from cdcl.errors import CdclError


def _xml(regions: list[list[tuple[float, float]]]) -> str:
    vertices = ["".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in region) for region in regions]
    body = "".join(f'<Region Id="{i}"><Vertices>{v}</Vertices></Region>' for i, v in enumerate(vertices, start=1))
    return f'<Annotations><Annotation Id="1"><Regions>{body}</Regions></Annotation></Annotations>'


def test_reads_every_region_in_order(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(_xml([[(1, 2), (3.5, 4), (5, 6)], [(7, 8), (9, 10)]]))
    polygons = read_aperio_xml(path)
    assert [p.tolist() for p in polygons] == [[[1, 2], [3.5, 4], [5, 6]], [[7, 8], [9, 10]]]
    path.write_text(_xml([]))
    assert read_aperio_xml(path) == []


def _pnpoly(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The README's rule, written as plainly as possible: one pixel and one edge at a time."""
    inside = np.zeros(shape, dtype=bool)
    for r in range(shape[0]):
        for c in range(shape[1]):
            x, y = c + 1, r + 1
            for (xi, yi), (xj, yj) in zip(polygon, np.roll(polygon, 1, axis=0)):
                if (yi > y) != (yj > y) and x < xi + (y - yi) * (xj - xi) / (yj - yi):
                    inside[r, c] = not inside[r, c]
    return inside


def test_square_follows_the_half_open_rule():
    square = np.array([[1, 1], [4, 1], [4, 4], [1, 4]], dtype=float)
    expected = np.zeros((6, 6), np.int32)
    expected[0:3, 0:3] = 1  # points (1..3, 1..3): left and top edges in, right and bottom edges out
    np.testing.assert_array_equal(rasterize_polygons([square], (6, 6)), expected)


def test_matches_the_rule_on_random_polygons():
    rng = np.random.default_rng(1)
    shape = (16, 20)
    for trial in range(30):
        k = int(rng.integers(3, 12))
        integral = trial % 2 == 0  # MoNuSeg has integer vertices: many pixel centres lie exactly on edges
        polygon = rng.integers(-3, 24, (k, 2)).astype(float) if integral else rng.uniform(-3, 24, (k, 2))
        expected = _pnpoly(polygon, shape)
        np.testing.assert_array_equal(rasterize_polygons([polygon], shape) > 0, expected, err_msg=str(polygon))


def test_first_region_wins_and_degenerate_regions_are_skipped():
    big = np.array([[1, 1], [9, 1], [9, 9], [1, 9]], dtype=float)
    inside_big = np.array([[3, 3], [5, 3], [5, 5], [3, 5]], dtype=float)
    line = np.array([[1, 1], [5, 5], [9, 9]], dtype=float)  # zero area: no pixel
    two = np.array([[1, 1], [5, 5]], dtype=float)
    off_image = big + 100
    side = np.array([[9, 1], [12, 1], [12, 4], [9, 4]], dtype=float)
    labels = rasterize_polygons([two, big, inside_big, line, off_image, side], (12, 12))
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) == {0, 1, 2}  # ids stay consecutive over the regions that have pixels
    assert (labels[0:8, 0:8] == 1).all() and labels[0:3, 8:11].tolist() == [[2] * 3] * 3


def test_polygon_crossing_the_border_is_clipped():
    labels = rasterize_polygons([np.array([[-5, -5], [3, -5], [3, 3], [-5, 3]], dtype=float)], (4, 4))
    expected = np.zeros((4, 4), np.int32)
    expected[0:2, 0:2] = 1
    np.testing.assert_array_equal(labels, expected)


SECRET = "TOP-SECRET-CONTENT"
HOSTILE = {
    "malformed": ('<Annotations><Region><Vertices><Vertex X="1" Y="2"></Vertices>', "malformed XML"),
    "empty": ("", "empty XML file"),
    "blank": ("   \n", "malformed XML"),
    "not aperio": ("<svg><path/></svg>", "not an Aperio ImageScope XML file"),
    "no coordinates": (
        '<Annotations><Region><Vertices><Vertex X="1"/></Vertices></Region></Annotations>',
        "Region 1: a Vertex without numeric X and Y",
    ),
    "xxe": (
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<Annotations><Region Id="&x;"/></Annotations>',
        "refused XML with a DTD",
    ),
    "billion laughs": (
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "ha">'
        + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
        + ']><Annotations><Region Id="&j;"/></Annotations>',
        "refused XML with a DTD",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_bad_and_hostile_xml_is_refused(tmp_path, case):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    text, problem = HOSTILE[case]
    path = tmp_path / f"{case}.xml"
    path.write_text(text.replace("{secret}", str(secret)))
    with pytest.raises(CdclError) as err:
        read_aperio_xml(path)
    assert err.value.path == str(path)
    assert problem in err.value.problem
    assert SECRET not in str(err.value)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_monuseg_test_xmls_reproduce_the_test_masks(shared_data):
    folder = shared_data / "monuseg" / "test"
    xmls = sorted((folder / "annotations").glob("*.xml"))
    assert len(xmls) == 14
    for xml in xmls:
        expected = np.asarray(Image.open(folder / "masks" / f"{xml.stem}.png")).astype(np.int32)
        labels = rasterize_polygons(read_aperio_xml(xml), expected.shape)
        assert np.count_nonzero(np.unique(labels)) == np.count_nonzero(np.unique(expected)), xml.name
        assert _iou(labels > 0, expected > 0) >= 0.97, xml.name
        np.testing.assert_array_equal(labels, expected, err_msg=xml.name)  # the README's rule is exact


def test_missing_xml_file_is_named(tmp_path):
    path = tmp_path / "gone.xml"
    with pytest.raises(CdclError, match="cannot read XML file") as err:
        read_aperio_xml(path)
    assert err.value.path == str(path)
