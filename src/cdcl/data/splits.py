"""Label-budget splits: which training items (whole images or tiles) are labeled, which are not, and which
whole images are held out for validation and test. ``cdcl split`` writes them as plain text lists.

Protocol:

- Test: a dataset with ``train/`` and ``test/`` subsets keeps its official test images; otherwise a seeded
  share (``test_fraction``, default 0.2) of the annotated images. Validation (``val_fraction``, default 0.1 of
  the annotated training images, at least one) is drawn from them, never from test; validation and test items
  are whole images. Both shares count annotated images only, as only those can be scored: a folder of 20
  annotated tiles and 2,000 unannotated ones gives 4 test and 2 validation images, not all 20 to test.
- The remaining training images, cut into ``tile`` x ``tile`` tiles when ``tile`` is set (MoNuSeg: 250, giving
  16 tiles per 1000 x 1000 image), are the training items. ``round(labeled_fraction x N)`` of them are labeled,
  where N counts the items of *all* training images including the validation ones, so the MoNuSeg budgets are
  the literature's 15, 30 and 60 of 480 tiles for 1/32, 1/16 and 1/8; the rest are unlabeled. Labeled items come
  from images with masks only, and there are at most as many as exist (fraction 1 labels them all).
- Every draw uses one ``numpy.random.default_rng(seed)`` over sorted names, in the order test, validation,
  labeled: the same inputs and seed give byte-identical files on any machine, and with one seed a smaller
  budget's labeled items are a subset of a larger budget's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from cdcl.data.readers import Item, NucleiDataset, tile_name
from cdcl.errors import CdclError
from cdcl.io import ensure_writable_dir, write_json_atomic, write_text_atomic
from cdcl.windows import window_starts

__all__ = ["Split", "make_split", "parse_fraction", "read_split_file", "tile_windows", "write_split"]

DEFAULT_TILE = {"monuseg": 250}
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2
LISTS = ("labeled", "unlabeled", "val", "test")


@dataclass
class Split:
    """Item names per list (sorted), plus the parameters that produced them (written to split.json)."""

    labeled: list[str]
    unlabeled: list[str]
    val: list[str]
    test: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in LISTS}


def parse_fraction(text: str) -> float:
    """A labeled fraction in (0, 1] written as "1/16", "0.0625" or "1"."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise CdclError(f"invalid fraction '{text}' (expected e.g. 1/16, 0.0625 or 1)") from None
    if not 0 < value <= 1:
        raise CdclError(f"fraction '{text}' must be greater than 0 and at most 1")
    return float(value)


def tile_windows(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of a grid of ``tile`` x ``tile`` windows covering an image, row by row.

    When a side is not a multiple of ``tile``, its last window is moved back to end at the border (overlapping
    its neighbour) so every pixel is covered by full-size tiles; a side shorter than ``tile`` is one window.
    """
    return [(y, y + th, x, x + tw) for y, th in _starts(height, tile) for x, tw in _starts(width, tile)]


def _starts(length: int, tile: int) -> list[tuple[int, int]]:
    if length <= tile:
        return [(0, length)]
    return [(start, tile) for start in window_starts(length, tile)]


def make_split(
    dataset: NucleiDataset,
    labeled_fraction: float,
    seed: int,
    *,
    tile: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
) -> Split:
    """Seeded labeled/unlabeled/val/test lists for ``dataset`` (see the module docstring for the protocol)."""
    if tile is not None and tile <= 0:
        raise CdclError(f"tile size must be a positive number of pixels, got {tile}")
    val_fraction = _share(DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, "validation")
    rng = np.random.default_rng(seed)
    pool, test = _pool_and_test(dataset, test_fraction, rng)
    annotated = [item for item in pool if item.has_mask]
    val = _draw(annotated, _count(val_fraction, len(annotated)), rng)
    val_names = {item.name for item in val}
    train = [item for item in pool if item.name not in val_names]
    units = [unit for item in train for unit in _units(item, tile)]
    candidates = [unit for unit in units if unit.has_mask]
    if not candidates:
        raise CdclError(
            f"no annotated training image left to label ({len(val)} went to validation, {len(test)} to test)",
            dataset.root,
        )
    n_pool_units = len(units) + sum(len(_units(item, tile)) for item in val)
    labeled = _draw(candidates, _count(labeled_fraction, n_pool_units), rng)
    labeled_names = {unit.name for unit in labeled}
    split = Split(
        labeled=sorted(labeled_names),
        unlabeled=sorted(unit.name for unit in units if unit.name not in labeled_names),
        val=sorted(val_names),
        test=sorted(item.name for item in test),
    )
    split.params = {
        "data": str(dataset.root),
        "format": dataset.format,
        "labeled_fraction": labeled_fraction,
        "seed": seed,
        "tile": tile,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "training_items": n_pool_units,
        "counts": split.counts(),
    }
    return split


def _pool_and_test(
    dataset: NucleiDataset, test_fraction: float | None, rng: np.random.Generator
) -> tuple[list[Item], list[Item]]:
    """Training images and test images: the official ``test/`` subset when there is one, else a seeded share."""
    subsets = sorted({item.name.split("/", 1)[0] for item in dataset if "/" in item.name})
    unknown = [name for name in subsets if name not in ("train", "test")]
    if unknown:
        raise CdclError(f"unexpected subset '{unknown[0]}/' (splits understand train/ and test/)", dataset.root)
    if subsets and "train" not in subsets:
        raise CdclError("the dataset has subsets but no train/ subset to draw training items from", dataset.root)
    pool = [item for item in dataset if not subsets or item.name.startswith("train/")]
    if "test" in subsets:
        if test_fraction is not None:
            raise CdclError("this dataset has an official test/ subset; --test applies only to datasets without one")
        return pool, [item for item in dataset if item.name.startswith("test/")]
    fraction = _share(DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction, "test")
    annotated = [item for item in pool if item.has_mask]
    test = _draw(annotated, _count(fraction, len(annotated)), rng)
    test_names = {item.name for item in test}
    return [item for item in pool if item.name not in test_names], test


def _units(item: Item, tile: int | None) -> list[Item]:
    """The training items one image contributes: itself, or its tiles."""
    if tile is None:
        return [item]
    return [replace(item, name=tile_name(item.name, w), window=w) for w in tile_windows(*item.shape, tile)]


def _draw(candidates: list[Item], count: int, rng: np.random.Generator) -> list[Item]:
    """``count`` (at most all) of ``candidates``, chosen by a seeded permutation of the name-sorted list."""
    ordered = sorted(candidates, key=lambda item: item.name)
    return [ordered[i] for i in rng.permutation(len(ordered))[: min(count, len(ordered))]]


def _count(fraction: float, total: int) -> int:
    """round(fraction x total) with halves rounded up, and at least 1 when the fraction is positive."""
    return max(1, int(fraction * total + 0.5)) if fraction > 0 and total > 0 else 0


def _share(value: float, what: str) -> float:
    if not 0 <= value < 1:
        raise CdclError(f"{what} share must be at least 0 and below 1, got {value}")
    return value


def write_split(split: Split, out_dir: str | Path) -> None:
    """labeled.txt, unlabeled.txt, val.txt, test.txt (one name per line) and split.json, each atomically."""
    out_dir = ensure_writable_dir(out_dir)
    for name in LISTS:
        write_text_atomic(out_dir / f"{name}.txt", "".join(f"{item}\n" for item in getattr(split, name)))
    write_json_atomic(out_dir / "split.json", split.params)


def read_split_file(path: str | Path, dataset: NucleiDataset) -> list[str]:
    """Item names listed in a split file, each checked to be an item (or tile) of ``dataset``.

    Names are looked up, never joined into paths, so a line such as ``../../etc/passwd`` is just an unknown
    item. Blank lines and lines starting with '#' are skipped; an empty list is returned as is.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CdclError("split file not found", path) from None
    except UnicodeDecodeError:
        raise CdclError("split file is not UTF-8 text", path) from None
    except OSError as exc:
        raise CdclError(f"cannot read split file ({exc.strerror or exc})", path) from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in seen:
            raise CdclError(f"line {number}: duplicate item '{name}' (also on line {seen[name]})", path)
        try:
            dataset.item(name)
        except CdclError as err:
            raise CdclError(f"line {number}: {err.problem}", path) from None
        seen[name] = number
        names.append(name)
    return names
