"""Label-budget splits: the MoNuSeg protocol, seeded splits, byte-identical files, and split-file validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdcl.cli import main
from cdcl.data import load_dataset
from cdcl.data.splits import make_split, parse_fraction, read_split_file, tile_windows, write_split
from cdcl.errors import CdclError


@pytest.mark.parametrize("text, value", [("1/16", 0.0625), ("0.0625", 0.0625), ("1", 1.0), (" 1/32 ", 0.03125)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "2", "-1/16", "1/0", "nan", "3/2"])
def test_parse_fraction_refuses(text):
    with pytest.raises(CdclError, match="fraction"):
        parse_fraction(text)


def test_tile_windows_cover_the_image():
    assert len(tile_windows(1000, 1000, 250)) == 16
    assert tile_windows(1000, 1000, 250)[:2] == [(0, 250, 0, 250), (0, 250, 250, 500)]
    assert tile_windows(600, 200, 250) == [(0, 250, 0, 200), (250, 500, 0, 200), (350, 600, 0, 200)]


def _base(name: str) -> str:
    return name.split("[", 1)[0]


@pytest.fixture(scope="module")
def monuseg(shared_data):
    return load_dataset(shared_data / "monuseg", "monuseg")


def test_monuseg_protocol(monuseg):
    splits = {f: make_split(monuseg, parse_fraction(f), 0, tile=250) for f in ("1/32", "1/16", "1/8", "1")}
    for fraction, n_labeled in [("1/32", 15), ("1/16", 30), ("1/8", 60), ("1", 432)]:
        split = splits[fraction]
        assert len(split.labeled) == n_labeled
        assert len(split.labeled) + len(split.unlabeled) == 27 * 16
        assert len(split.val) == 3 and all(name.startswith("train/") and "[" not in name for name in split.val)
        assert split.test == [n for n in monuseg.names() if n.startswith("test/")] and len(split.test) == 14
        train_images = {_base(name) for name in split.labeled + split.unlabeled}
        assert not train_images & set(split.val) and len(train_images) == 27
        assert all(monuseg.item(name).shape == (250, 250) for name in split.labeled)
    assert splits["1"].unlabeled == []
    assert set(splits["1/32"].labeled) < set(splits["1/16"].labeled) < set(splits["1/8"].labeled)
    assert splits["1/16"].val == splits["1/8"].val  # validation does not move with the budget
    assert make_split(monuseg, 1 / 16, 1, tile=250).labeled != splits["1/16"].labeled


def test_monuseg_refuses_a_test_share_with_an_official_test_set(monuseg):
    with pytest.raises(CdclError, match="official test/ subset"):
        make_split(monuseg, 0.5, 0, tile=250, test_fraction=0.2)


def test_seeded_split_without_official_test(shared_data):
    ds = load_dataset(shared_data / "dsb2018", "dsb2018")
    split = make_split(ds, 1 / 8, 3)
    assert split.counts() == {"labeled": 12, "unlabeled": 74, "val": 10, "test": 24}  # 24 = 0.2 x 120, 10 = 0.1 x 96
    lists = [split.labeled, split.unlabeled, split.val, split.test]
    assert sorted(sum(lists, [])) == ds.names()  # a partition of the images
    assert len(make_split(ds, 0.001, 3).labeled) == 1
    assert make_split(ds, 1 / 8, 3, val_fraction=0.0).val == []


def _folder(root: Path, n_labeled: int, n_unlabeled: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_labeled + n_unlabeled):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "images" / f"im{i:02d}.png")
        if i < n_labeled:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray((rng.random((40, 60)) > 0.7).astype(np.uint8)).save(root / "masks" / f"im{i:02d}.png")
    return root


def test_unlabeled_images_are_never_labeled_val_or_test(tmp_path):
    ds = load_dataset(_folder(tmp_path, 8, 12), "folder")
    split = make_split(ds, 1.0, 0, tile=30, val_fraction=0.1, test_fraction=0.2)
    labeled_images = {item.name for item in ds if item.has_mask}
    # test 0.2 x 8 and val 0.1 x 6 annotated images, rounded; 4 tiles of 30 x 30 per image
    assert split.counts() == {"labeled": 20, "unlabeled": 48, "val": 1, "test": 2}
    assert set(split.test) | set(split.val) <= labeled_images
    assert {_base(n) for n in split.labeled} == labeled_images - set(split.test) - set(split.val)
    assert all(ds.item(name).shape == (30, 30) for name in split.labeled + split.unlabeled)


def test_test_and_validation_shares_count_annotated_images_only(tmp_path):
    """The lab's case: 20 annotated tiles beside 200 cut from unannotated slides. Shares of all 220 images sent
    every annotated one to test and left nothing to train on."""
    ds = load_dataset(_folder(tmp_path, 20, 200), "folder")
    split = make_split(ds, 1.0, 0)
    assert split.counts() == {"labeled": 14, "unlabeled": 200, "val": 2, "test": 4}
    assert set(split.labeled + split.val + split.test) == {item.name for item in ds if item.has_mask}


def test_split_files_are_byte_identical_for_the_same_seed(tmp_path, monuseg):
    for out in ("a", "b"):
        write_split(make_split(monuseg, 1 / 16, 7, tile=250), tmp_path / out)
    names = ["labeled.txt", "unlabeled.txt", "val.txt", "test.txt", "split.json"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    labeled = (tmp_path / "a" / "labeled.txt").read_text().splitlines()
    assert len(labeled) == 30 and labeled == sorted(labeled)
    assert read_split_file(tmp_path / "a" / "labeled.txt", monuseg) == labeled


def test_cli_split(tmp_path, shared_data, capsys):
    out = tmp_path / "split"
    args = ["split", str(shared_data / "monuseg"), "--format", "monuseg", "--seed", "2", "--out", str(out)]
    assert main([*args, "--labeled", "1/8"]) == 0
    assert "60 labeled, 372 unlabeled, 3 val, 14 test" in capsys.readouterr().out
    assert len((out / "labeled.txt").read_text().splitlines()) == 60
    assert main([*args, "--labeled", "1/0"]) == 2
    assert "invalid fraction '1/0'" in capsys.readouterr().err
    assert main([*args, "--labeled", "1/8", "--tile", "0"]) == 0
    assert "4 labeled, 23 unlabeled, 3 val, 14 test" in capsys.readouterr().out  # round(1/8 x 30) whole images


def test_read_split_file_validates_every_line(tmp_path, monuseg):
    path = tmp_path / "list.txt"
    path.write_text("# labeled tiles\n\ntrain/TCGA-18-5592-01Z-00-DX1[0:250,0:250]\n  test/TCGA-2Z-A9J9-01A-01-TS1  \n")
    assert read_split_file(path, monuseg) == [
        "train/TCGA-18-5592-01Z-00-DX1[0:250,0:250]",
        "test/TCGA-2Z-A9J9-01A-01-TS1",
    ]
    for bad, problem in [
        ("../../etc/passwd", "line 2: unknown item '../../etc/passwd'"),
        ("/etc/passwd", "line 2: unknown item '/etc/passwd'"),
        ("train/TCGA-18-5592-01Z-00-DX1[0:250,900:1100]", "line 2: tile"),
        ("test/TCGA-2Z-A9J9-01A-01-TS1", "line 2: duplicate item 'test/TCGA-2Z-A9J9-01A-01-TS1' (also on line 1)"),
    ]:
        path.write_text(f"test/TCGA-2Z-A9J9-01A-01-TS1\n{bad}\n")
        with pytest.raises(CdclError) as err:
            read_split_file(path, monuseg)
        assert err.value.path == str(path) and err.value.problem.startswith(problem)
    path.write_text("")
    assert read_split_file(path, monuseg) == []
    with pytest.raises(CdclError, match="split file not found"):
        read_split_file(tmp_path / "absent.txt", monuseg)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CdclError, match="not UTF-8"):
        read_split_file(path, monuseg)


def test_cli_split_on_a_broken_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    root = _folder(tmp_path / "data", 3, 0)
    (root / "images" / "im01.tif").write_bytes((root / "images" / "im01.png").read_bytes())
    argv = ["split", str(root), "--format", "folder", "--labeled", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cdcl split: error: {root / 'images' / 'im01.tif'}: duplicate stem 'im01' (also im01.png)"
    assert not (tmp_path / "out").exists()
