"""The one exception type users see: the CLI prints it as a single line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class CdclError(Exception):
    """Bad input or usage. ``str(err)`` is one line naming the file (when there is one) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = " ".join(str(problem).split())
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
