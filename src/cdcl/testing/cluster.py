"""A Dask worker plugin for tests and benchmarks: the worker predicting a given slide dies in the middle of it,
once (as a worker killed for memory or by a node failure would), so the retry on another worker can be checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

import cdcl.wsi.journal


class DieMidSlide(WorkerPlugin):
    """Ends the worker process (``os._exit``, no clean-up) when it records the second tile of ``stem``, unless
    ``marker`` exists; it creates ``marker`` first, so the slide's next try runs to the end."""

    name = "cdcl-die-mid-slide"

    def __init__(self, stem: str, marker: Path) -> None:
        self.stem, self.marker = stem, marker

    def setup(self, worker: Any) -> None:
        append = cdcl.wsi.journal.Journal.append
        stem, marker = self.stem, self.marker

        def append_or_die(journal: cdcl.wsi.journal.Journal, index: int, nuclei_json: str) -> None:
            if journal.folder.name == f"{stem}.partial" and journal.finished and not marker.exists():
                marker.touch()
                os._exit(1)
            append(journal, index, nuclei_json)

        cdcl.wsi.journal.Journal.append = append_or_die
