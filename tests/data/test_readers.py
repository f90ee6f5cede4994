"""Dataset layouts behind load_dataset: pairing, laziness, tiles, and one clear error per bad layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cdcl.data.readers as readers
from cdcl.data import Item, load_dataset, require_masks
from cdcl.data.readers import scan_dataset
from cdcl.errors import CdclError

RNG = np.random.default_rng(0)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(h: int = 8, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _instances(h: int = 8, w: int = 10) -> np.ndarray:
    labels = np.zeros((h, w), np.uint16)
    labels[1:3, 1:4] = 5
    labels[4:7, 5:9] = 9
    return labels


def _folder(root: Path) -> Path:
    """a: RGB + instance mask, b: grey + binary mask (two blobs), c: unlabeled TIFF."""
    _save(root / "images" / "a.png", _image())
    _save(root / "masks" / "a.png", _instances())
    _save(root / "images" / "b.png", _image()[:, :, 0])
    _save(root / "masks" / "b.png", (_instances() > 0).astype(np.uint8) * 255)
    _save(root / "images" / "c.tif", _image())
    return root


def test_folder_pairs_images_and_masks_by_stem(tmp_path):
    ds = load_dataset(_folder(tmp_path), "folder")
    assert ds.names() == ["a", "b", "c"] and len(ds) == 3 and ds.format == "folder"
    a, b, c = ds
    assert [item.has_mask for item in ds] == [True, True, False]
    np.testing.assert_array_equal(a.instances, _instances())
    assert a.image.shape == (8, 10, 3) and b.image.shape == (8, 10, 3)
    np.testing.assert_array_equal(b.instances, np.where(_instances() == 5, 1, np.where(_instances() == 9, 2, 0)))
    assert c.instances is None and c.image.dtype == np.uint8
    assert ds.item("b") is b and ds.subset(["c", "a"]) == [c, a]


def test_subsets_give_prefixed_names(tmp_path):
    _folder(tmp_path / "train")
    _save(tmp_path / "test" / "images" / "z.png", _image())
    (tmp_path / "notes").mkdir()  # folders without images/ are not subsets
    assert load_dataset(tmp_path, "folder").names() == ["test/z", "train/a", "train/b", "train/c"]


def test_loading_reads_no_pixels(tmp_path, monkeypatch, shared_data):
    def forbidden(*args):
        raise AssertionError("read at load time")

    for name in ("read_image", "read_label_image", "read_foreground", "image_size", "read_aperio_xml"):
        monkeypatch.setattr(readers, name, forbidden)
    assert len(load_dataset(shared_data / "dsb2018", "dsb2018")) == 120
    assert len(load_dataset(shared_data / "monuseg", "monuseg")) == 44
    assert len(load_dataset(_folder(tmp_path), "folder")) == 3


def test_tile_names_resolve_to_crops(tmp_path):
    ds = load_dataset(_folder(tmp_path), "folder")
    tile = ds.item("a[2:6,3:9]")
    assert tile.name == "a[2:6,3:9]" and tile.window == (2, 6, 3, 9) and tile.shape == (4, 6)
    np.testing.assert_array_equal(tile.image, ds.item("a").image[2:6, 3:9])
    np.testing.assert_array_equal(tile.instances, _instances()[2:6, 3:9])
    assert ds.item("c[0:8,0:10]").instances is None


@pytest.mark.parametrize(
    "name, problem",
    [
        ("zz", "unknown item 'zz'"),
        ("../../etc/passwd", "unknown item '../../etc/passwd'"),
        ("/etc/passwd", "unknown item '/etc/passwd'"),
        ("a[0:8,0:10][0:2,0:2]", "unknown item"),
        ("a[0:9,0:10]", "lies outside the 8x10 image"),
        ("a[4:4,0:10]", "is empty"),
    ],
)
def test_bad_item_names_are_refused(tmp_path, name, problem):
    ds = load_dataset(_folder(tmp_path), "folder")
    with pytest.raises(CdclError, match=problem.replace("[", r"\[")):
        ds.item(name)


def test_require_masks_names_the_unlabeled_item(tmp_path):
    ds = load_dataset(_folder(tmp_path), "folder")
    require_masks(ds.subset(["a", "b"]))
    with pytest.raises(CdclError, match="item 'c' has no mask") as err:
        require_masks(ds)
    assert err.value.path == str(tmp_path / "images" / "c.tif")


def test_mask_of_another_size_is_named_when_read(tmp_path):
    root = _folder(tmp_path)
    _save(root / "masks" / "a.png", _instances(8, 11))
    item = load_dataset(root, "folder").item("a")  # loading is lazy: no error yet
    with pytest.raises(CdclError, match="mask is 8x11 but its image is 8x10") as err:
        item.instances
    assert err.value.path == str(root / "masks" / "a.png")


def _layout_error(root: Path, fmt: str = "folder") -> CdclError:
    with pytest.raises(CdclError) as err:
        load_dataset(root, fmt)
    assert "\n" not in str(err.value)
    return err.value


def test_layout_problems_name_the_file(tmp_path):
    root = _folder(tmp_path / "dup")
    _save(root / "images" / "a.tif", _image())
    err = _layout_error(root)
    assert err.path == str(root / "images" / "a.tif") and "duplicate stem 'a' (also a.png)" in err.problem

    root = _folder(tmp_path / "stray")
    (root / "images" / "notes.txt").write_text("hello")
    (root / "images" / ".DS_Store").write_text("hidden files are ignored")
    err = _layout_error(root)
    assert err.path == str(root / "images" / "notes.txt") and "unexpected file" in err.problem

    root = _folder(tmp_path / "orphan")
    _save(root / "masks" / "q.png", _instances())
    err = _layout_error(root)
    assert err.path == str(root / "masks" / "q.png") and "no image with stem 'q'" in err.problem

    (tmp_path / "empty" / "images").mkdir(parents=True)
    err = _layout_error(tmp_path / "empty")
    assert err.path == str(tmp_path / "empty" / "images") and err.problem == "no images in this folder"

    (tmp_path / "bare").mkdir()
    err = _layout_error(tmp_path / "bare")
    assert err.path == str(tmp_path / "bare") and "no images/ folder" in err.problem

    err = _layout_error(tmp_path / "absent")
    assert err.path == str(tmp_path / "absent") and err.problem == "dataset folder not found"


def test_all_layout_problems_are_collected(tmp_path):
    root = _folder(tmp_path)
    (root / "images" / "notes.txt").write_text("hello")
    _save(root / "masks" / "q.png", _instances())
    dataset, problems = scan_dataset(root, "folder")
    assert dataset.names() == ["a", "b", "c"]
    assert [p.path for p in problems] == [str(root / "images" / "notes.txt"), str(root / "masks" / "q.png")]
    assert "(and 1 more problem: `cdcl data check` lists them)" in _layout_error(root).problem


def test_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(CdclError, match="unknown dataset format 'coco': expected one of folder, monuseg, dsb2018"):
        load_dataset(tmp_path, "coco")


def test_monuseg_prefers_masks_and_falls_back_to_xml(tmp_path):
    _save(tmp_path / "images" / "a.tif", _image(6, 6))
    _save(tmp_path / "images" / "b.tif", _image(6, 6))
    _save(tmp_path / "masks" / "a.png", _instances(6, 6))
    xml = "<Annotations><Region><Vertices>{}</Vertices></Region></Annotations>"
    square = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in [(1, 1), (4, 1), (4, 4), (1, 4)])
    (tmp_path / "annotations").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "annotations" / f"{stem}.xml").write_text(xml.format(square))
    a, b = load_dataset(tmp_path, "monuseg")
    np.testing.assert_array_equal(a.instances, _instances(6, 6))
    expected = np.zeros((6, 6), np.int32)
    expected[0:3, 0:3] = 1
    np.testing.assert_array_equal(b.instances, expected)


def _dsb_item(root: Path, name: str, masks: list[tuple[str, np.ndarray]]) -> None:
    _save(root / name / "images" / f"{name}.png", np.dstack([_image(6, 7), np.full((6, 7), 255, np.uint8)]))
    for mask_name, mask in masks:
        _save(root / name / "masks" / mask_name, mask.astype(np.uint8) * 255)


def test_dsb2018_earliest_mask_file_wins_on_overlap(tmp_path):
    left, right = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
    left[1:4, 1:4] = True
    right[2:5, 3:6] = True  # overlaps `left` at rows 2-3, column 3
    _dsb_item(tmp_path / "stage1_train", "id1", [("m2.png", left), ("m1.png", right)])
    _save(tmp_path / "stage1_train" / "id2" / "images" / "id2.png", _image(6, 7))
    one, two = load_dataset(tmp_path, "dsb2018")
    assert (one.name, two.name, two.has_mask) == ("id1", "id2", False)
    expected = np.where(right, 1, np.where(left, 2, 0))  # m1.png is nucleus 1 and keeps the shared pixels
    np.testing.assert_array_equal(one.instances, expected)
    assert one.image.shape == (6, 7, 3)
    assert load_dataset(tmp_path / "stage1_train", "dsb2018").names() == ["id1", "id2"]


def test_dsb2018_folder_of_several_sets_reads_as_one(tmp_path):
    _dsb_item(tmp_path / "dsb" / "stage1_train", "id1", [("m1.png", np.ones((6, 7), bool))])
    _dsb_item(tmp_path / "dsb-extra" / "stage1_train", "id9", [])
    _save(tmp_path / "other" / "images" / "x.png", _image())  # not a Kaggle-layout set: ignored
    (tmp_path / "README.md").write_text("notes")
    ds = load_dataset(tmp_path, "dsb2018")
    assert ds.names() == ["dsb-extra/id9", "dsb/id1"]
    assert ds.item("dsb/id1").instances.max() == 1 and not ds.item("dsb-extra/id9").has_mask


def test_dsb2018_mask_of_another_size_is_named(tmp_path):
    _dsb_item(tmp_path, "id1", [("m1.png", np.ones((6, 7), bool)), ("m2.png", np.ones((6, 8), bool))])
    with pytest.raises(CdclError, match="mask is 6x8 but its image is 6x7") as err:
        load_dataset(tmp_path, "dsb2018")[0].instances
    assert err.value.path == str(tmp_path / "id1" / "masks" / "m2.png")


def test_dsb2018_layout_problems(tmp_path):
    _dsb_item(tmp_path, "id1", [])
    (tmp_path / "id1" / "images" / "id1b.png").write_bytes((tmp_path / "id1" / "images" / "id1.png").read_bytes())
    err = _layout_error(tmp_path, "dsb2018")
    assert err.path == str(tmp_path / "id1") and "expected exactly one image in images/, found 2" in err.problem
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdclError, match="no <id>/images/<id>.png folders found"):
        load_dataset(tmp_path / "empty", "dsb2018")


def test_items_pickle_for_dataloader_workers(tmp_path):
    import pickle

    ds = load_dataset(_folder(tmp_path), "folder")
    item = pickle.loads(pickle.dumps(ds.item("a[0:4,0:4]")))
    assert isinstance(item, Item)
    np.testing.assert_array_equal(item.instances, _instances()[0:4, 0:4])
    assert pickle.loads(pickle.dumps(ds)).names() == ds.names()


def test_monuseg_real_layout(shared_data):
    ds = load_dataset(shared_data / "monuseg", "monuseg")
    names = ds.names()
    assert sum(n.startswith("train/") for n in names) == 30 and sum(n.startswith("test/") for n in names) == 14
    assert all(item.has_mask for item in ds)
    assert isinstance(ds.item("test/TCGA-2Z-A9J9-01A-01-TS1").mask, readers.LabelImageMask)  # masks/ preferred
    test_only = load_dataset(shared_data / "monuseg" / "test", "monuseg")
    assert test_only.names() == [n.removeprefix("test/") for n in names if n.startswith("test/")]
    nuclei = sum(np.count_nonzero(np.unique(item.instances)) for item in ds if item.name.startswith("train/"))
    assert nuclei == 16958  # the README's count for train/masks


def test_dsb2018_real_nucleus_counts(shared_data):
    ds = load_dataset(shared_data / "dsb2018", "dsb2018")
    assert len(ds) == 120 and all(item.has_mask for item in ds)
    for item in ds[:4]:
        n_files = len(os.listdir(item.image_path.parents[1] / "masks"))
        labels = item.instances
        assert labels.shape == item.image.shape[:2] == item.shape
        assert np.count_nonzero(np.unique(labels)) == n_files, item.name
