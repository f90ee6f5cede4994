"""A tiny synthetic dataset + split + config overrides that train in seconds on a CPU (shared by tests)."""

from __future__ import annotations

from pathlib import Path

from cdcl.data import load_dataset
from cdcl.data.splits import Split, write_split
from cdcl.data.synthetic import write_synthetic_dataset

TINY_MODEL = [
    "model.encoder=resnet18",
    "model.decoder_channels=[16,16,16]",
    "model.feature_channels=16",
    "model.head_channels=8",
    "model.embed_dim=8",
    "augment.crop_size=64",
    "infer.window=64",
]


def tiny_dataset(root: Path, n: int = 10) -> tuple[Path, Path]:
    """10 synthetic 96 px tiles: 3 labeled, 5 unlabeled, 2 val. Returns (data dir, split dir)."""
    data = root / "data"
    if not (data / "images").is_dir():
        write_synthetic_dataset(data, n, seed=1, size=96)
    names = load_dataset(data, "folder").names()
    split = root / "split"
    write_split(Split(labeled=names[:3], unlabeled=names[3:8], val=names[8:10], test=[]), split)
    return data, split


def tiny_overrides(data: Path, split: Path, method: str = "cdcl", iterations: int = 6, **extra: object) -> list[str]:
    base = [
        f"data.root={data}",
        "data.format=folder",
        f"data.split_dir={split}",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.unlabeled_batch_size=2",
        f"method.name={method}",
        "method.warmup_iters=2",
        "method.ramp_iters=2",
        "method.threshold=0.5",
        "method.num_anchors=64",
        "method.num_bank_samples=64",
        f"train.iterations={iterations}",
        "train.val_every=2",
        "train.log_every=1",
        "train.device=cpu",
        "train.deterministic=true",
        "train.tune_postprocess=false",
        *TINY_MODEL,
    ]
    return base + [f"{k}={v}" for k, v in extra.items()]
