"""Datasets: readers (folder, monuseg, dsb2018), image and mask decoding, tiling and seeded splits, augmented
views and the training loaders, synthetic H&E-like tiles, and the dataset report and view grid of ``cdcl data``.
It knows no network and no training method: it may import ``instances`` (the training targets of an instance
representation) and the top-level utilities (``errors``, ``io``, ``vocab``, ``windows``), nothing else."""

from cdcl.data.images import IMAGE_SUFFIXES, read_image, read_label_image
from cdcl.data.readers import FORMATS, Item, NucleiDataset, load_dataset, require_masks

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "Item",
    "NucleiDataset",
    "load_dataset",
    "read_image",
    "read_label_image",
    "require_masks",
]
