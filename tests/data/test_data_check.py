"""`cdcl data check`: counts and nuclei of a clean dataset, every problem of a broken one, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdcl.cli import main
from cdcl.data.check import check_dataset


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _dataset(root: Path) -> Path:
    """Three labeled images (2, 3 and 0 nuclei) of two sizes, plus one unlabeled image."""
    image = np.full((20, 30, 3), 200, np.uint8)
    for stem, n_nuclei in [("a", 2), ("b", 3), ("c", 0)]:
        _save(root / "images" / f"{stem}.png", image)
        mask = np.zeros((20, 30), np.uint16)
        for k in range(n_nuclei):
            mask[2:5, 3 + 5 * k : 6 + 5 * k] = 10 + k
        _save(root / "masks" / f"{stem}.png", mask)
    _save(root / "images" / "d.png", np.full((40, 10, 3), 9, np.uint8))
    return root


def test_clean_dataset_report(tmp_path):
    report = check_dataset(_dataset(tmp_path), "folder")
    assert report["problems"] == []
    assert (report["images"], report["labeled"], report["unlabeled"]) == (4, 3, 1)
    assert report["image_sizes"] == {"min": "40x10", "max": "20x30", "unique": {"20x30": 3, "40x10": 1}}
    assert report["nuclei_per_image"] == {"images": 3, "min": 0, "median": 2.0, "max": 3, "total": 5}


def test_cli_clean_dataset_exits_0_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["data", "check", str(_dataset(tmp_path / "d")), "--format", "folder", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["images", "4", "(3", "labeled,", "1", "unlabeled)"]
    assert lines[-1].startswith("no problems found in 4 images")
    assert json.loads(out.read_text())["nuclei_per_image"]["total"] == 5


def test_every_problem_is_listed(tmp_path, capsys):
    root = _dataset(tmp_path)
    (root / "images" / "notes.txt").write_text("stray")
    _save(root / "masks" / "orphan.png", np.zeros((20, 30), np.uint8))
    cut = root / "images" / "b.png"
    cut.write_bytes(cut.read_bytes()[:60])
    _save(root / "masks" / "c.png", np.zeros((21, 30), np.uint8))
    (root / "images" / "e.png").write_bytes(b"")
    report = check_dataset(root, "folder")
    assert [p.split(": ", 1)[0] for p in report["problems"]] == [
        str(root / "images" / "notes.txt"),
        str(root / "masks" / "orphan.png"),
        str(root / "images" / "b.png"),
        str(root / "masks" / "c.png"),
        str(root / "images" / "e.png"),
    ]
    assert "mask is 21x30 but its image is 20x30" in report["problems"][3]
    assert main(["data", "check", str(root), "--format", "folder"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"5 problems found in {root}"
    assert lines[-2] == f"  {report['problems'][-1]}"


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--format", "dsb2018"], "no <id>/images/<id>.png folders found"),
        (["--format", "folder"], "no images/ folder"),
    ],
)
def test_unusable_dataset_is_one_line_and_exit_2(tmp_path, capsys, argv_tail, message):
    assert main(["data", "check", str(tmp_path), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(tmp_path) in err


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path), "--format", "coco"])
    assert exit_.value.code == 2
    assert "invalid choice: 'coco'" in capsys.readouterr().err


def test_monuseg_test_set_is_clean(shared_data):
    report = check_dataset(shared_data / "monuseg" / "test", "monuseg")
    assert report["problems"] == [] and report["images"] == report["labeled"] == 14
    assert report["image_sizes"]["unique"] == {"1000x1000": 14}
    assert report["nuclei_per_image"]["total"] == 6697  # the README's count for test/masks
