"""Datasets: readers (folder, monuseg, dsb2018), image and mask decoding, tiling and seeded splits, views."""

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
