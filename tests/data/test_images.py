"""Image and mask decoding: every pixel layout normalised, every bad file refused with its name."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cdcl.data.images import image_size, read_foreground, read_image, read_label_image
from cdcl.errors import CdclError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (12, 10, 3), dtype=np.uint16)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("a.png", {}),
        ("a.bmp", {}),
        ("lzw.tif", {"compression": "tiff_lzw"}),
        ("packbits.tif", {"compression": "packbits"}),
    ],
)
def test_lossless_rgb_round_trip(tmp_path, name, kwargs):
    out = read_image(_save(tmp_path / name, RGB, **kwargs))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


def test_rgba_drops_alpha_and_grey_becomes_rgb(tmp_path):
    rgba = np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(read_image(_save(tmp_path / "a.png", rgba)), RGB)
    grey = RGB[:, :, 0]
    np.testing.assert_array_equal(read_image(_save(tmp_path / "g.png", grey)), np.dstack([grey] * 3))
    grey_alpha = Image.fromarray(grey).convert("LA")
    grey_alpha.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.dstack([grey] * 3))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_palette_image_uses_its_colours(tmp_path, suffix):
    palette = Image.fromarray(RGB).quantize(5)
    palette.save(tmp_path / f"p{suffix}")
    np.testing.assert_array_equal(read_image(tmp_path / f"p{suffix}"), np.asarray(palette.convert("RGB")))


def test_16_bit_images_keep_their_top_byte(tmp_path):
    grey16 = RGB16[:, :, 0]
    np.testing.assert_array_equal(read_image(_save(tmp_path / "g16.png", grey16))[:, :, 1], grey16 >> 8)
    tifffile.imwrite(tmp_path / "rgb16.tif", RGB16, photometric="rgb", compression="lzw")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.tif"), RGB16 >> 8)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(RGB16, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), RGB16 >> 8)


def test_bilevel_image_is_black_and_white(tmp_path):
    bits = RGB[:, :, 0] > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[:, :, 0], bits.astype(np.uint8) * 255)


def test_image_size_reads_the_header(tmp_path):
    assert image_size(_save(tmp_path / "a.png", RGB)) == (12, 10)
    tifffile.imwrite(tmp_path / "a.tif", RGB16, photometric="rgb")
    assert image_size(tmp_path / "a.tif") == (12, 10)


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("these are notes, not pixels\n")
    noise = RNG.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cut.tif", noise, photometric="rgb", compression="lzw", rowsperstrip=16)
    return {
        "missing": (tmp_path / "missing.png", "file not found"),
        "zero bytes": (tmp_path / "empty.png", "empty file (0 bytes)"),
        "text named .png": (tmp_path / "text.png", "not a readable image"),
        "truncated png": (_truncated(_save(tmp_path / "cut.png", noise)), "not a readable image"),
        "truncated jpeg": (_truncated(_save(tmp_path / "cut.jpg", noise)), "not a readable image"),
        "truncated tiff": (_truncated(tmp_path / "cut.tif"), "not a readable image"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "zero bytes", "text named .png", "truncated png", "truncated jpeg", "truncated tiff"]
)
@pytest.mark.parametrize("reader", [read_image, read_label_image])
def test_bad_files_name_the_file_and_the_problem(tmp_path, case, reader):
    path, problem = _bad_files(tmp_path)[case]
    with pytest.raises(CdclError) as err:
        reader(path)
    assert err.value.path == str(path)
    assert problem in err.value.problem
    assert "\n" not in str(err.value)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (with a valid CRC) claims ``width`` x ``height`` pixels: a decompression bomb."""
    _save(path, np.zeros((1, 1), np.uint8))
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 100
    for reader in (read_image, read_label_image):
        with pytest.raises(CdclError, match="decompression bomb") as err:
            reader(bomb)
        assert err.value.path == str(bomb)


def test_pixel_limit_comes_from_the_environment(tmp_path, monkeypatch):
    png = _save(tmp_path / "a.png", RGB)
    tifffile.imwrite(tmp_path / "a.tif", RGB, photometric="rgb")
    monkeypatch.setenv("CDCL_MAX_IMAGE_PIXELS", "100")
    for path in (png, tmp_path / "a.tif"):
        with pytest.raises(CdclError, match=r"10 x 12 = 120 pixels, over the limit of 100"):
            read_image(path)
    monkeypatch.setenv("CDCL_MAX_IMAGE_PIXELS", "120")
    assert read_image(png).shape == (12, 10, 3)
    monkeypatch.setenv("CDCL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(CdclError, match="CDCL_MAX_IMAGE_PIXELS must be a positive integer"):
        read_image(png)


INSTANCES = np.array([[0, 0, 3, 3], [7, 0, 3, 0], [7, 7, 0, 300], [0, 0, 0, 300]], dtype=np.uint16)


def test_instance_maps_are_kept_as_they_are(tmp_path):
    for name, values in [("u16.png", INSTANCES), ("u8.png", np.minimum(INSTANCES, 200).astype(np.uint8))]:
        out = read_label_image(_save(tmp_path / name, values))
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, values)
    tifffile.imwrite(tmp_path / "i32.tif", INSTANCES.astype(np.int32))
    np.testing.assert_array_equal(read_label_image(tmp_path / "i32.tif"), INSTANCES)
    tifffile.imwrite(tmp_path / "f32.tif", INSTANCES.astype(np.float32))
    np.testing.assert_array_equal(read_label_image(tmp_path / "f32.tif"), INSTANCES)
    same = np.dstack([np.minimum(INSTANCES, 200).astype(np.uint8)] * 3)
    np.testing.assert_array_equal(read_label_image(_save(tmp_path / "rgb.png", same)), np.minimum(INSTANCES, 200))


def test_palette_mask_gives_its_indices(tmp_path):
    indices = np.minimum(INSTANCES, 9).astype(np.uint8)
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette(list(RNG.integers(0, 256, 768)))
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "p.png"), indices)


def test_binary_mask_becomes_4_connected_components(tmp_path):
    binary = np.array([[255, 255, 0, 0], [255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 0, 255]], dtype=np.uint8)
    expected = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 2, 0, 3], [0, 0, 0, 3]])
    np.testing.assert_array_equal(read_label_image(_save(tmp_path / "b.png", binary)), expected)
    np.testing.assert_array_equal(read_foreground(tmp_path / "b.png"), binary > 0)
    assert not read_label_image(_save(tmp_path / "z.png", np.zeros((3, 3), np.uint8))).any()


@pytest.mark.parametrize(
    "values, problem",
    [
        (np.array([[0.0, 1.5], [2.0, 0.0]], np.float32), "non-integral"),
        (np.array([[0.0, np.nan], [2.0, 0.0]], np.float32), "non-integral"),
        (np.array([[0, -1], [2, 0]], np.int32), "negative values"),
        (
            np.dstack([INSTANCES.astype(np.uint8), INSTANCES.astype(np.uint8) // 2, INSTANCES.astype(np.uint8)]),
            "channels differ",
        ),
    ],
)
def test_invalid_masks_are_refused(tmp_path, values, problem):
    tifffile.imwrite(tmp_path / "m.tif", values)
    with pytest.raises(CdclError, match=problem) as err:
        read_label_image(tmp_path / "m.tif")
    assert err.value.path == str(tmp_path / "m.tif")


def test_monuseg_train_lzw_tiffs_read(shared_data):
    paths = sorted((shared_data / "monuseg" / "train" / "images").glob("*.tif"))
    assert len(paths) == 30
    for path in paths:
        pixels = read_image(path)
        assert pixels.shape == (1000, 1000, 3) and pixels.dtype == np.uint8
        assert 20 < pixels.mean() < 250 and pixels.std() > 5  # real tissue, not a blank or garbage decode
