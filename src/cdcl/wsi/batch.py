"""A batch of slides: all opened and checked before any is read, then worked on one by one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from cdcl.errors import CdclError
from cdcl.wsi.readers import FileSlideReader, SlideReader, choose_level, open_slide

log = logging.getLogger(__name__)


def open_slides(paths: Sequence[Path], mpp_override: float | None, target_mpp: float | None) -> list[FileSlideReader]:
    """Every slide of a batch opened (:func:`open_slide`) and checked against ``target_mpp`` (the resolution to
    read at; None: level 0) before any is read, so a bad one stops the command before it has done anything."""
    readers = [open_slide(path, mpp_override, need_mpp=target_mpp is not None) for path in paths]
    for reader in readers:
        choose_level(reader, target_mpp)
    return readers


def for_each_slide(readers: Sequence[SlideReader], work: Callable[[SlideReader], None]) -> None:
    """``work(reader)`` for every slide of a batch; then one CdclError names every failed slide
    (:func:`slide_failures`, :func:`raise_failures`)."""
    raise_failures(slide_failures(readers, work), len(readers))


def slide_failures(readers: Sequence[SlideReader], work: Callable[[SlideReader], None]) -> dict[str, str]:
    """``work(reader)`` for every slide of a batch; returns the one-line error of each failed slide by name. A slide
    that fails with a CdclError (no tissue, a damaged tile, another run writing it) is reported and the others
    still run. A single slide's own error is raised as it is."""
    failures = {}
    for number, reader in enumerate(readers, 1):
        if len(readers) > 1:
            log.info("slide %d of %d: %s", number, len(readers), reader.name)
        try:
            work(reader)
        except CdclError as err:
            if len(readers) == 1:
                raise
            log.error("%s (going on with the other slides)", err)
            failures[reader.name] = str(err)
    return failures


def raise_failures(failures: dict[str, str], total: int) -> None:
    """One CdclError naming every failed slide of a batch of ``total`` (nothing when none failed): the same line
    whether the slides ran here or on a Dask cluster."""
    if failures:
        rest = "the others are done; " if len(failures) < total else ""
        raise CdclError(
            f"{len(failures)} of {total} slides failed ({rest}a re-run keeps what is done): "
            f"{'; '.join(failures.values())}"
        )
