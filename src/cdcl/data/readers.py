"""Dataset readers behind one call, ``load_dataset(root, format)``: lazy items with an image and an instance map.

Only directory listings happen at load time; pixels are read when ``Item.image`` or ``Item.instances`` is
accessed (each access reads again, nothing is cached, so a dataset of thousands of images never sits in memory).

Layouts (hidden files, whose names start with '.', are ignored everywhere):

- ``folder``: ``images/`` + optional ``masks/``, paired by file stem; an image without a mask is unlabeled.
- ``monuseg``: ``images/`` + ``masks/`` (label images) and/or ``annotations/*.xml`` (Aperio ImageScope);
  when both a mask and an XML exist for an image, the mask is used (it is the published rasterisation and
  needs no polygon filling).
- Both accept either that layout directly under ``root`` (item names are stems) or subsets, e.g.
  ``root/train/images`` and ``root/test/images`` (item names are ``train/<stem>``, ``test/<stem>``).
- ``dsb2018``: the Kaggle layout ``[stage1_train/]<id>/images/<id>.png`` + ``<id>/masks/*.png``, one binary
  mask per nucleus; item names are the ids. Nucleus k (1-based) is the k-th mask file in filename order, and a
  pixel claimed by several masks belongs to the earliest one, so overlaps resolve the same way on every machine.
  Without a ``masks/`` folder the item is unlabeled; an empty one means an image without nuclei.
  A folder holding several such datasets (``root/<set>/stage1_train/``, e.g. ``dsb2018/`` beside
  ``dsb2018-extra/``) is read as one, with item names ``<set>/<id>``; its other entries are ignored.

A tile of an item is named ``<name>[y0:y1,x0:x1]`` (rows, then columns, half-open); ``NucleiDataset.item``
resolves such names to a crop of the base item.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, overload

import numpy as np

from cdcl.data.aperio import rasterize_polygons, read_aperio_xml
from cdcl.data.images import IMAGE_SUFFIXES, image_size, read_foreground, read_image, read_label_image
from cdcl.errors import CdclError
from cdcl.vocab import FORMATS

__all__ = ["FORMATS", "Item", "NucleiDataset", "load_dataset", "require_masks", "scan_dataset", "tile_name"]

_TILE = re.compile(r"^(?P<base>.+)\[(?P<y0>\d+):(?P<y1>\d+),(?P<x0>\d+):(?P<x1>\d+)\]$")
Window = tuple[int, int, int, int]


class MaskSource(Protocol):
    """Where an item's instances come from; ``read`` raises CdclError naming its file on a size mismatch."""

    path: Path

    def read(self, shape: tuple[int, int]) -> np.ndarray: ...


@dataclass(frozen=True)
class LabelImageMask:
    """An instance label image or a binary mask (see ``read_label_image``)."""

    path: Path

    def read(self, shape: tuple[int, int]) -> np.ndarray:
        return _same_size(read_label_image(self.path), shape, self.path)


@dataclass(frozen=True)
class AperioMask:
    """Aperio ImageScope XML polygons, rasterised with the MoNuSeg rule."""

    path: Path

    def read(self, shape: tuple[int, int]) -> np.ndarray:
        return rasterize_polygons(read_aperio_xml(self.path), shape)


@dataclass(frozen=True)
class NucleusMasks:
    """A folder of binary masks, one nucleus per file (DSB2018); listed when read, not when loaded."""

    path: Path

    def read(self, shape: tuple[int, int]) -> np.ndarray:
        files, problems = _files_by_stem(self.path, IMAGE_SUFFIXES)
        if problems:
            raise problems[0]
        labels = np.zeros(shape, dtype=np.int32)
        # Painted last to first, so on overlaps the earliest file in name order keeps the pixel.
        for nucleus_id, mask_path in reversed(list(enumerate(sorted(files.values()), start=1))):
            labels[_same_size(read_foreground(mask_path), shape, mask_path)] = nucleus_id
        return labels


def _same_size(labels: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    if labels.shape != tuple(shape):
        raise CdclError(f"mask is {labels.shape[0]}x{labels.shape[1]} but its image is {shape[0]}x{shape[1]}", path)
    return labels


@dataclass(frozen=True)
class Item:
    """One image of a dataset (or a tile of one), read lazily: nothing is read at construction."""

    name: str
    image_path: Path
    mask: MaskSource | None = None
    window: Window | None = None
    """(y0, y1, x0, x1) of a tile within the image; None for the whole image."""

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), from the image header (or the tile window) without decoding pixels."""
        if self.window is None:
            return image_size(self.image_path)
        y0, y1, x0, x1 = self.window
        return y1 - y0, x1 - x0

    @property
    def image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB pixels (read on every access)."""
        return self._crop(read_image(self.image_path))

    @property
    def instances(self) -> np.ndarray | None:
        """H x W int32 instance ids, 0 = background (ids as in the whole image for tiles); None if unlabeled."""
        if self.mask is None:
            return None
        return self._crop(self.mask.read(image_size(self.image_path)))

    def _crop(self, pixels: np.ndarray) -> np.ndarray:
        if self.window is None:
            return pixels
        y0, y1, x0, x1 = self.window
        if y1 > pixels.shape[0] or x1 > pixels.shape[1]:
            raise CdclError(
                f"tile '{self.name}' lies outside the {pixels.shape[0]}x{pixels.shape[1]} image", self.image_path
            )
        return pixels[y0:y1, x0:x1].copy()


def tile_name(name: str, window: Window) -> str:
    """The item name of a tile: ``name[y0:y1,x0:x1]``."""
    y0, y1, x0, x1 = window
    return f"{name}[{y0}:{y1},{x0}:{x1}]"


def require_masks(items: Iterable[Item], source: str | Path | None = None) -> None:
    """Raise CdclError naming the first item that has no mask and how many lack one (for lists that must be
    labeled); the error names ``source`` (the list file) when given, else that item's image."""
    missing = [item for item in items if not item.has_mask]
    if missing:
        raise CdclError(
            f"item '{missing[0].name}' has no mask ({len(missing)} unannotated items in a list that needs masks)",
            source or missing[0].image_path,
        )


class NucleiDataset(Sequence[Item]):
    """The items of one dataset folder, sorted by name; also resolves tile names to crops."""

    def __init__(self, root: Path, format: str, items: Iterable[Item]) -> None:
        self.root = Path(root)
        self.format = format
        self._items = sorted(items, key=lambda item: item.name)
        self._by_name = {item.name: item for item in self._items}

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"NucleiDataset(root='{self.root}', format='{self.format}', items={len(self)})"

    def names(self) -> list[str]:
        return [item.name for item in self._items]

    def item(self, name: str) -> Item:
        """The item called ``name``, or a crop ``base[y0:y1,x0:x1]`` of one (checked against the image size)."""
        if name in self._by_name:
            return self._by_name[name]
        match = _TILE.match(name)
        base = self._by_name.get(match["base"]) if match else None
        if base is None:
            raise CdclError(f"unknown item '{name}'", self.root)
        y0, y1, x0, x1 = (int(match[key]) for key in ("y0", "y1", "x0", "x1"))
        height, width = base.shape
        if not (y0 < y1 <= height and x0 < x1 <= width):
            raise CdclError(f"tile '{name}' is empty or lies outside the {height}x{width} image", base.image_path)
        return replace(base, name=name, window=(y0, y1, x0, x1))

    def subset(self, names: Sequence[str]) -> list[Item]:
        return [self.item(name) for name in names]


def load_dataset(root: str | Path, format: str) -> NucleiDataset:
    """The dataset under ``root`` in layout ``format`` (folder, monuseg, dsb2018); CdclError on any problem."""
    dataset, problems = scan_dataset(root, format)
    if problems:
        first = problems[0]
        n_more = len(problems) - 1
        more = f" (and {n_more} more problem{'s' * (n_more > 1)}: `cdcl data check` lists them)" if n_more else ""
        raise CdclError(first.problem + more, first.path)
    return dataset


def scan_dataset(root: str | Path, format: str) -> tuple[NucleiDataset, list[CdclError]]:
    """Like ``load_dataset``, but layout problems (stray files, duplicate stems, orphan masks, ...) are
    collected and the offending files left out instead of raising; for ``cdcl data check``.

    Still raises when nothing can be listed: unknown format, missing root, no image folder at all.
    """
    if format not in _SCANNERS:
        raise CdclError(f"unknown dataset format '{format}': expected one of {', '.join(FORMATS)}")
    root = Path(root)
    if not root.is_dir():
        raise CdclError("dataset folder not found" if not root.exists() else "dataset path is not a folder", root)
    problems: list[CdclError] = []
    items = _SCANNERS[format](root, problems)
    return NucleiDataset(root, format, items), problems


def _scan_folder(root: Path, problems: list[CdclError]) -> list[Item]:
    return _scan_subsets(root, [("masks", IMAGE_SUFFIXES, LabelImageMask)], problems)


def _scan_monuseg(root: Path, problems: list[CdclError]) -> list[Item]:
    sources = [("masks", IMAGE_SUFFIXES, LabelImageMask), ("annotations", (".xml",), AperioMask)]
    return _scan_subsets(root, sources, problems)


Source = tuple[str, tuple[str, ...], Callable[[Path], MaskSource]]


def _scan_subsets(root: Path, sources: list[Source], problems: list[CdclError]) -> list[Item]:
    """Items of ``root/images`` or, when absent, of every ``root/<subset>/images`` (names ``<subset>/<stem>``)."""
    if (root / "images").is_dir():
        return _scan_pairs(root, "", sources, problems)
    subsets = [path for path in _visible(root) if (path / "images").is_dir()]
    if not subsets:
        raise CdclError("no images/ folder (expected images/ beside masks/, or subsets such as train/images/)", root)
    return [item for subset in subsets for item in _scan_pairs(subset, f"{subset.name}/", sources, problems)]


def _scan_pairs(folder: Path, prefix: str, sources: list[Source], problems: list[CdclError]) -> list[Item]:
    """Images of ``folder/images`` paired by stem with the first source (in order) that has a file for them."""
    images, found = _files_by_stem(folder / "images", IMAGE_SUFFIXES)
    problems += found
    if not images:
        problems.append(CdclError("no images in this folder", folder / "images"))
    masks: dict[str, MaskSource] = {}
    for subfolder, suffixes, make in sources:
        if not (folder / subfolder).is_dir():
            continue
        files, found = _files_by_stem(folder / subfolder, suffixes)
        problems += found
        for stem, path in files.items():
            if stem in images:
                masks.setdefault(stem, make(path))
            else:
                problems.append(CdclError(f"no image with stem '{stem}' in {folder / 'images'}", path))
    return [Item(prefix + stem, path, masks.get(stem)) for stem, path in images.items()]


def _scan_dsb(root: Path, problems: list[CdclError]) -> list[Item]:
    if not (root / "stage1_train").is_dir():
        sets = [path for path in _visible(root) if (path / "stage1_train").is_dir()]
        if sets:  # several Kaggle-layout datasets side by side: one dataset whose names say which set
            return [replace(item, name=f"{s.name}/{item.name}") for s in sets for item in _scan_dsb(s, problems)]
    base = root / "stage1_train" if (root / "stage1_train").is_dir() else root
    items = []
    for folder in _visible(base):
        if not folder.is_dir():
            problems.append(CdclError("unexpected file (expected one folder per image: <id>/images/<id>.png)", folder))
            continue
        image = _dsb_image(folder, problems)
        if image is not None:
            masks = folder / "masks"
            items.append(Item(folder.name, image, NucleusMasks(masks) if masks.is_dir() else None))
    if not items and not problems:
        raise CdclError("no <id>/images/<id>.png folders found (expected the DSB2018 stage1_train layout)", base)
    return items


def _dsb_image(folder: Path, problems: list[CdclError]) -> Path | None:
    images, found = _files_by_stem(folder / "images", IMAGE_SUFFIXES) if (folder / "images").is_dir() else ({}, [])
    problems += found
    if len(images) != 1:
        problems.append(CdclError(f"expected exactly one image in images/, found {len(images)}", folder))
        return None
    return next(iter(images.values()))


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> tuple[dict[str, Path], list[CdclError]]:
    """Files of ``folder`` by stem, sorted, plus the problems: other entries and stems seen twice."""
    files: dict[str, Path] = {}
    problems = []
    for path in _visible(folder):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            kind = "folder" if path.is_dir() else "file"
            problems.append(CdclError(f"unexpected {kind} (expected {'/'.join(suffixes)} files only)", path))
        elif path.stem in files:
            problems.append(CdclError(f"duplicate stem '{path.stem}' (also {files[path.stem].name})", path))
        else:
            files[path.stem] = path
    return files, problems


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` in name order, without hidden ones (.DS_Store, ._*, .ipynb_checkpoints)."""
    try:
        return sorted(path for path in folder.iterdir() if not path.name.startswith("."))
    except OSError as exc:
        raise CdclError(f"cannot list folder ({exc.strerror or exc})", folder) from None


_SCANNERS: dict[str, Callable[[Path, list[CdclError]], list[Item]]] = {
    "folder": _scan_folder,
    "monuseg": _scan_monuseg,
    "dsb2018": _scan_dsb,
}
if tuple(_SCANNERS) != FORMATS:  # the config and the CLI offer cdcl.vocab.FORMATS
    raise ImportError(f"dataset readers {tuple(_SCANNERS)} differ from cdcl.vocab.FORMATS {FORMATS}")
