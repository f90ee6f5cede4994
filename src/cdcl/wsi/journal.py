"""The resume journal of a slide: finished tiles as JSON lines, beside the settings that produced them.

``<stem>.partial/tiles.jsonl`` gets one line per finished tile; ``run.json`` records the settings. A run with
the same settings continues after the finished tiles (a line cut short by a kill is truncated away); other
settings start the slide over.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cdcl.io import complete_lines, write_json_atomic

log = logging.getLogger(__name__)


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON object an earlier run wrote (settings, a summary); None when missing, damaged or not an object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def lock_path(out_dir: Path, stem: str) -> Path:
    """The file a run of ``stem`` holds locked (``cdcl.wsi.pipeline.only_run``); ``cdcl cohort`` looks at it to
    tell running slides."""
    return out_dir / f".{stem}.lock"


def as_recorded(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare with a record."""
    return json.loads(json.dumps(obj))


class Journal:
    """Finished tiles as JSON lines, next to the settings that produced them (resume or restart cleanly)."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder, self.lines = folder, folder / "tiles.jsonl"
        self.finished: set[int] = set()
        run_file = folder / "run.json"
        if self.lines.is_file() and read_record(run_file) == as_recorded(key):
            try:
                self.finished = self._recover()
                return
            except (ValueError, KeyError, TypeError):
                log.warning("%s is damaged; starting the slide over", self.lines)
        elif folder.exists():
            log.info("%s was made with other settings; starting the slide over", folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.lines.touch()
        write_json_atomic(run_file, key)

    def _recover(self) -> set[int]:
        """Indices of complete lines; a line cut by a kill (no final newline) is truncated away."""
        data = self.lines.read_bytes()
        complete = complete_lines(data)
        if len(complete) != len(data):
            with open(self.lines, "r+b") as fh:
                fh.truncate(len(complete))
        return {json.loads(line)["tile"] for line in complete.splitlines()}

    def append(self, index: int, nuclei_json: str) -> None:
        """Record a finished tile; ``nuclei_json`` is the JSON text of its ``[measurements, ring]`` list."""
        with open(self.lines, "a") as fh:
            fh.write(f'{{"tile":{index},"nuclei":{nuclei_json}}}\n')
        self.finished.add(index)

    def nuclei(self) -> Iterator[tuple[dict[str, Any], list]]:
        """``(measurements, ring)`` of every kept nucleus, with slide-wide ids 1..N in tile order."""
        nucleus_id = 0
        with open(self.lines) as fh:
            for line in fh:
                for row, ring in json.loads(line)["nuclei"]:
                    nucleus_id += 1
                    yield {**row, "id": nucleus_id}, ring
