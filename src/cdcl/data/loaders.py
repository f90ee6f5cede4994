"""Torch datasets and samplers for training: seeded per sample, so a resumed run sees the same batches.

The sampler yields ``(index, sample_seed)`` pairs from an endless stream of seeded epoch permutations;
each sample's augmentation draws only from ``np.random.default_rng(sample_seed)``. The stream is a pure
function of (seed, rank, position), so resuming at iteration t replays exactly what an uninterrupted run
would have seen, whatever the number of workers. Under DDP each rank takes every world_size-th element.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cdcl.data.views import AugmentConfig, labeled_view, paired_views
from cdcl.errors import from_workers
from cdcl.instances.representations import make_targets
from cdcl.vocab import STRONG_VIEWS


class SeededStreamSampler(Sampler):
    """Endless ``(index, sample_seed)`` stream; epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int, *, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.seed, self.start, self.rank, self.world_size = n, seed, start, rank, world_size

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start  # position in this rank's stream
        while True:
            global_pos = position * self.world_size + self.rank
            epoch, offset = divmod(global_pos, self.n)
            index = int(self._epoch(epoch)[offset])
            sample_seed = int(np.random.default_rng([self.seed, epoch, offset, 7]).integers(2**62))
            yield index, sample_seed
            position += 1


class _ImageCache:
    """Bounded per-worker cache of decoded items (images, masks; a tile caches its crop), each decoded once per
    worker."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes, self.bytes, self.entries = max_bytes, 0, OrderedDict()

    def get(self, key: str, load) -> np.ndarray:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = load()
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        return value


class _ItemSet(Dataset):
    """Items with a bounded decode cache; subclasses turn one item into its training views. ``stain``: the stain
    normalisation (``cdcl.data.stain``) applied to each image once, as decoded, before any augmentation."""

    def __init__(
        self, items: Sequence, augment: AugmentConfig, stain: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.items, self.augment, self.stain, self.cache = list(items), augment, stain, _ImageCache()

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, item) -> np.ndarray:
        return self.cache.get(item.name, lambda: item.image if self.stain is None else self.stain(item.image))


class LabeledSet(_ItemSet):
    """Labeled items -> {"image": 3xSxS float, "target": SxS int64 classes, ...} augmented views, with the
    targets of the model's instance representation (``cdcl.instances.representations.make_targets``)."""

    def __init__(
        self,
        items: Sequence,
        augment: AugmentConfig,
        representation: str = "binary",
        stain: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        super().__init__(items, augment, stain)
        self.representation = representation

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        item = self.items[index]
        instances = self.cache.get(item.name + "#mask", lambda: item.instances)
        view, labels = labeled_view(self._image(item), instances, np.random.default_rng(seed), self.augment)
        targets = make_targets(labels, self.representation)
        return {"image": torch.from_numpy(view), **{k: torch.from_numpy(v) for k, v in targets.items()}}


class UnlabeledSet(_ItemSet):
    """Unlabeled items -> {"weak": ..., "strong": ...} (and "strong2" with ``strong_views`` 2): one shared
    geometry, photometry on the strong views only."""

    def __init__(
        self,
        items: Sequence,
        augment: AugmentConfig,
        strong_views: int = 1,
        stain: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        super().__init__(items, augment, stain)
        if not 1 <= strong_views <= len(STRONG_VIEWS):
            raise ValueError(f"strong_views must be in [1, {len(STRONG_VIEWS)}], got {strong_views}")
        self.strong_views = strong_views

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        weak, *strong = paired_views(
            self._image(self.items[index]), np.random.default_rng(seed), self.augment, self.strong_views
        )
        return {"weak": torch.from_numpy(weak), **{k: torch.from_numpy(v) for k, v in zip(STRONG_VIEWS, strong)}}


def stream_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start_batch: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless iterator of batches starting at batch ``start_batch`` of this rank's stream."""
    sampler = SeededStreamSampler(len(dataset), seed, start=start_batch * batch_size, rank=rank, world_size=world_size)
    # Its own generator: creating the loader must not consume the global RNG that dropout draws from.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return from_workers(loader)
