"""Atomic writes: complete files under the final name or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from cdcl.errors import CdclError
from cdcl.io import atomic_path, ensure_writable_dir, write_json_atomic


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_previous_file_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise RuntimeError
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_outputs_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_output_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CdclError, match="cannot create output folder"):
        ensure_writable_dir(tmp_path / "file.txt" / "out")


def test_an_output_name_taken_by_a_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "labels.png").mkdir()
    with pytest.raises(CdclError, match="cannot write the output") as err:
        write_json_atomic(tmp_path / "labels.png", {"a": 1})
    assert str(tmp_path / "labels.png") in str(err.value)
    assert (tmp_path / "labels.png").is_dir() and not list(tmp_path.glob(".labels.png.*"))
