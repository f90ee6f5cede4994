"""The domain tracks' split files (issues 19 and 22): labels from one domain, unlabeled and test images from another.

Deterministic: the same data gives byte-identical files (sorted names, one seeded generator per draw).

- ``splits/monuseg-organ``: ``organs.csv`` maps each MoNuSeg image to its TCGA study and organ by the tissue
  source site code (the two characters after ``TCGA-``). Labeled: 30 tiles (the 1/16 budget of MoNuSeg's 480
  training tiles) from the training images of breast, kidney and prostate; unlabeled: every tile of the other
  organs' training images (lung, bladder, colon, stomach); test: the test images of those other organs; val: one
  training image per labeled organ (the labeled domain: no target labels are used to choose anything).
- ``splits/dsb2018-type``: ``groups.csv`` sorts the 160 images of ``dsb2018/`` and ``dsb2018-extra/`` into
  fluorescence (dark background), brightfield (light, grey) and tissue (light, stained colour) by two colour
  statistics. Labeled: 1/16 of the fluorescence images; val: fluorescence images; unlabeled and test: the
  brightfield and tissue images, halved per group. The partition is drawn once (seed 0) so every seed and the
  cross-dataset rows share one test set; the seed changes the labeled images. ``test-tissue.txt`` and
  ``test-fluorescence.txt`` are the cross-dataset test lists; ``resolution.json`` the median nucleus diameters
  and the microns per pixel they imply for the tissue images; ``unlabeled-tissue.txt`` the tissue images of the
  unlabeled half (the lab route's unlabeled tiles, and the target validation images for choosing switches).
- ``splits/monuseg-lab``: the MoNuSeg 1/16 splits with an empty unlabeled list, for runs whose unlabeled images
  are another dataset's (``data.unlabeled_root``), as a lab's own slides would be.

    python benchmarks/domain_splits.py                  # rewrite both folders under splits/
    python benchmarks/domain_splits.py --out /tmp/s     # write elsewhere (the test compares the two)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np

from cdcl.data.readers import Item, load_dataset, tile_name
from cdcl.data.splits import Split, tile_windows, write_split
from cdcl.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data"  # relative to the repository root, as in the configs
SEEDS = (0, 1, 2)
BUDGET = "1-16"

TSS_PROJECT = {  # TCGA tissue source site -> TCGA study (GDC code tables), for the 44 MoNuSeg images
    "18": "LUSC", "21": "LUSC", "38": "LUAD", "44": "LUAD", "49": "LUAD", "50": "LUAD", "69": "LUAD",
    "A7": "BRCA", "AC": "BRCA", "AO": "BRCA", "AR": "BRCA", "E2": "BRCA",
    "B0": "KIRC", "2Z": "KIRP", "GL": "KIRP", "HE": "KIRP", "IZ": "KIRP",
    "CH": "PRAD", "EJ": "PRAD", "G9": "PRAD", "HC": "PRAD",
    "CU": "BLCA", "DK": "BLCA", "G2": "BLCA", "ZF": "BLCA",
    "A6": "COAD", "AY": "COAD", "NH": "COAD",
    "KB": "STAD", "RD": "STAD",
    "FG": "LGG", "HT": "LGG",
}  # fmt: skip
PROJECT_ORGAN = {
    "LUSC": "lung", "LUAD": "lung", "BRCA": "breast", "KIRC": "kidney", "KIRP": "kidney", "PRAD": "prostate",
    "BLCA": "bladder", "COAD": "colon", "STAD": "stomach", "LGG": "brain",
}  # fmt: skip
CHALLENGE_LIVER = {"18", "21", "38", "49", "50"}
"""Training images the MoNuSeg challenge lists as liver although their sites are TCGA lung studies."""
SOURCE_ORGANS = ("breast", "kidney", "prostate")
MONUSEG_TILE, MONUSEG_TILES, LABELED_SHARE = 250, 480, 1 / 16

DARK_BACKGROUND, GREY_SPREAD = 128.0, 5.0
"""Median grey level below which an image is fluorescence; mean channel spread (max - min over RGB) below
which a light image is brightfield rather than stained tissue."""
GROUPS = ("fluorescence", "brightfield", "tissue")
FLUO_TEST, FLUO_VAL = 0.2, 0.1


def draw(names: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` of ``names`` by a seeded permutation of the sorted list (as ``cdcl split`` draws)."""
    ordered = sorted(names)
    return sorted(ordered[i] for i in rng.permutation(len(ordered))[:count])


def organ_table(names: list[str]) -> list[dict[str, str]]:
    """One row per MoNuSeg image: subset, stem, site code, study, organ, and the challenge's organ name."""
    rows = []
    for name in sorted(names):
        subset, stem = name.split("/", 1)
        tss = stem.split("-")[1]
        organ = PROJECT_ORGAN[TSS_PROJECT[tss]]
        challenge = "liver" if subset == "train" and tss in CHALLENGE_LIVER else organ
        rows.append(
            {"name": name, "tss": tss, "project": f"TCGA-{TSS_PROJECT[tss]}", "organ": organ, "challenge": challenge}
        )
    return rows


def tiles(item: Item) -> list[str]:
    return [tile_name(item.name, w) for w in tile_windows(*item.shape, MONUSEG_TILE)]


def organ_split(dataset, rows: list[dict[str, str]], seed: int) -> Split:
    organ = {row["name"]: row["organ"] for row in rows}
    train = [it for it in dataset if it.name.startswith("train/")]
    rng = np.random.default_rng(seed)
    val = [draw([it.name for it in train if organ[it.name] == o], 1, rng)[0] for o in SOURCE_ORGANS]
    source = [t for it in train if organ[it.name] in SOURCE_ORGANS and it.name not in val for t in tiles(it)]
    labeled = draw(source, round(LABELED_SHARE * MONUSEG_TILES), rng)
    targets = {organ[it.name] for it in train} - set(SOURCE_ORGANS)  # test images of untrained organs: left out
    split = Split(
        labeled=labeled,
        unlabeled=sorted(t for it in train if organ[it.name] in targets for t in tiles(it)),
        val=sorted(val),
        test=sorted(n for n in organ if n.startswith("test/") and organ[n] in targets),
    )
    split.params = {
        "data": f"{DATA}/monuseg",
        "format": "monuseg",
        "track": "monuseg-organ",
        "labeled_organs": list(SOURCE_ORGANS),
        "seed": seed,
        "tile": MONUSEG_TILE,
        "counts": split.counts(),
    }
    return split


def colour_stats(item: Item) -> dict[str, float]:
    pixels = item.image.astype(np.float64)
    return {
        "median_grey": round(float(np.median(pixels.mean(axis=2))), 1),
        "channel_spread": round(float((pixels.max(axis=2) - pixels.min(axis=2)).mean()), 1),
    }


def group_of(stats: dict[str, float]) -> str:
    if stats["median_grey"] < DARK_BACKGROUND:
        return "fluorescence"
    return "brightfield" if stats["channel_spread"] < GREY_SPREAD else "tissue"


def dsb_partition(group: dict[str, str]) -> dict[str, list[str]]:
    """The seed-independent part: fluorescence test, val and labeled pool; target unlabeled and test (per
    group, half each, the odd one to unlabeled)."""
    rng = np.random.default_rng(0)
    fluo = sorted(n for n, g in group.items() if g == "fluorescence")
    test = draw(fluo, round(FLUO_TEST * len(fluo)), rng)
    val = draw([n for n in fluo if n not in test], round(FLUO_VAL * len(fluo)), rng)
    parts = {"fluo_test": test, "val": val, "pool": sorted(set(fluo) - set(test) - set(val))}
    for g in GROUPS[1:]:
        names = [n for n, gg in group.items() if gg == g]
        parts[f"{g}_test"] = draw(names, len(names) // 2, rng)
        parts[f"{g}_unlabeled"] = sorted(set(names) - set(parts[f"{g}_test"]))
    parts["n_fluo"] = fluo  # the share's denominator
    return parts


def dsb_split(parts: dict[str, list[str]], seed: int) -> Split:
    labeled = draw(parts["pool"], round(LABELED_SHARE * len(parts["n_fluo"])), np.random.default_rng(seed))
    split = Split(
        labeled=labeled,
        unlabeled=sorted(parts["brightfield_unlabeled"] + parts["tissue_unlabeled"]),
        val=parts["val"],
        test=sorted(parts["brightfield_test"] + parts["tissue_test"]),
    )
    split.params = {
        "data": DATA,
        "format": "dsb2018",
        "track": "dsb2018-type",
        "labeled_share": f"1/16 of the {len(parts['n_fluo'])} fluorescence images",
        "seed": seed,
        "tile": None,
        "counts": split.counts(),
    }
    return split


def median_diameter(items: list[Item]) -> float:
    """Median equivalent-circle diameter (pixels) over every nucleus of ``items``."""
    areas = [np.bincount(it.instances.ravel())[1:] for it in items]
    sizes = np.concatenate(areas)
    return round(float(np.median(2 * np.sqrt(sizes[sizes > 0] / np.pi))), 2)


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write_lines(path: Path, names: list[str]) -> None:
    write_text_atomic(path, "".join(f"{n}\n" for n in names))


def write_monuseg_organ(out: Path, data: Path) -> list[Item]:
    dataset = load_dataset(data / "monuseg", "monuseg")
    rows = organ_table(dataset.names())
    write_csv(out / "organs.csv", rows)
    for seed in SEEDS:
        write_split(organ_split(dataset, rows, seed), out / BUDGET / f"seed{seed}")
    return [it for it in dataset if it.name.startswith("train/")]


def write_dsb2018_type(out: Path, data: Path, monuseg_train: list[Item]) -> None:
    dataset = load_dataset(data, "dsb2018")
    rows = [{"name": it.name, **colour_stats(it)} for it in dataset]
    rows = [{**row, "group": group_of(row)} for row in rows]
    write_csv(out / "groups.csv", rows)
    parts = dsb_partition({row["name"]: row["group"] for row in rows})
    for seed in SEEDS:
        write_split(dsb_split(parts, seed), out / BUDGET / f"seed{seed}")
    write_lines(out / "test-tissue.txt", parts["tissue_test"])
    write_lines(out / "test-fluorescence.txt", parts["fluo_test"])
    write_lines(out / "unlabeled-tissue.txt", parts["tissue_unlabeled"])
    by_group = {g: [dataset.item(r["name"]) for r in rows if r["group"] == g] for g in GROUPS}
    diameters = {"monuseg-train": median_diameter(monuseg_train)}
    diameters |= {g: median_diameter(items) for g, items in by_group.items()}
    diameters["tissue-unlabeled"] = median_diameter([dataset.item(n) for n in parts["tissue_unlabeled"]])
    resolution = {
        "median_nucleus_diameter_px": diameters,
        "monuseg_mpp": 0.25,
        "tissue_mpp_from_monuseg": round(0.25 * diameters["monuseg-train"] / diameters["tissue-unlabeled"], 3),
        "tissue_scale_from_fluorescence": round(diameters["fluorescence"] / diameters["tissue-unlabeled"], 3),
        "note": "tissue_mpp_from_monuseg: the microns per pixel at which DSB tissue nuclei have MoNuSeg's median "
        "size (MoNuSeg is 0.25 um/px at 40x), measured on the target validation images (unlabeled-tissue.txt), "
        "never the test ones; the DSB fluorescence models have no mpp, so their scale is a ratio",
    }
    write_text_atomic(out / "resolution.json", json.dumps(resolution, indent=2) + "\n")


def write_monuseg_lab(out: Path, monuseg_splits: Path) -> None:
    """The MoNuSeg 1/16 splits without their unlabeled tiles: a lab's case, whose unlabeled images come from its own
    slides (``data.unlabeled_root``), not from the labeled dataset."""
    for seed in SEEDS:
        source = monuseg_splits / BUDGET / f"seed{seed}"
        lists = {name: (source / f"{name}.txt").read_text().split() for name in ("labeled", "val", "test")}
        split = Split(unlabeled=[], **lists)
        split.params = {"data": f"{DATA}/monuseg", "format": "monuseg", "track": "monuseg-lab", "seed": seed}
        split.params |= {"from": f"splits/monuseg/{BUDGET}/seed{seed} (unlabeled list emptied)"}
        write_split(split, out / BUDGET / f"seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "splits", help="folder to write the two tracks into")
    parser.add_argument("--data", type=Path, default=ROOT / DATA, help="folder holding monuseg/ and dsb2018*/")
    args = parser.parse_args()
    monuseg_train = write_monuseg_organ(args.out / "monuseg-organ", args.data)
    write_dsb2018_type(args.out / "dsb2018-type", args.data, monuseg_train)
    write_monuseg_lab(args.out / "monuseg-lab", ROOT / "splits" / "monuseg")
    print(f"wrote {args.out / 'monuseg-organ'}, {args.out / 'dsb2018-type'} and {args.out / 'monuseg-lab'}")


if __name__ == "__main__":
    main()
