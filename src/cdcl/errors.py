"""The one exception type users see: the CLI prints it as a single line and exits with code 2."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def squashed(message: object, limit: int | None = None) -> str:
    """``str(message)`` on one line (runs of white space folded to one space), cut to ``limit`` characters (all
    when None): a library's message can span lines or pages, and what a user sees is one line."""
    return " ".join(str(message).split())[:limit]


class CdclError(Exception):
    """Bad input or usage. ``str(err)`` is one line naming the file (when there is one) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = squashed(problem)
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


def from_workers(items: Iterable[T]) -> Iterator[T]:
    """``items`` (a DataLoader), with a CdclError raised in a worker process given back its own one line: the
    DataLoader re-raises it as ``CdclError("Caught CdclError in DataLoader worker process N. Original
    Traceback ... CdclError: path: problem")``."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except CdclError as err:
            if "DataLoader worker" not in err.problem:
                raise
            raise CdclError(err.problem.rpartition("CdclError: ")[2]) from None
        yield item
