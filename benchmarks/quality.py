"""Label-budget sweep, domain tracks and cross-dataset rows on real data: train, evaluate, tabulate (protocol 2).

Protocol 2 (issue 19). Every run is ``cdcl train`` (resumable: re-running continues) then ``cdcl evaluate`` of two
checkpoints on the test images: ``last.pt`` is the reported score (the weights of the last iteration the run
predicts with: the EMA teacher, as ``train.eval_model: ema`` is every method's default, with the post-processing
thresholds the engine tuned on val for them) and ``best.pt`` (chosen on the validation images) a secondary column,
so checkpoint choice adds no noise to the headline. 5 seeded splits at 1/32 and 1/16, 3 at 1/8 and full. The noise
floor trains one config and split (supervised, MoNuSeg 1/16, split seed 0) with run seeds 0-4 (``noise-floor``;
run seed 0 is the ``supervised`` run itself). The domain tracks read the splits ``domain_splits.py`` writes; the
cross-dataset rows train nothing: they evaluate another track's runs on another dataset's test images, beside
their in-domain score. Gaps are paired on split and seed, with a 95% t-interval over seeds.

Records carry ``"protocol": 2`` and live under ``"protocol2"`` in quality.json; protocol 1 records (best-on-val
checkpoint, 3 seeds, under ``"runs"``) are kept as they are and tabulated apart. Finished runs are skipped, a run
whose key holds a record of other settings is refused, and each result is merged under a lock as soon as it
exists (the Markdown tables and the plot are rewritten), so an interrupted sweep loses at most one run.

    python benchmarks/quality.py --list                      # the planned runs, in order
    python benchmarks/quality.py --only monuseg/1-16         # run (or resume) a subset
    python benchmarks/quality.py --report                    # rewrite table + plot from the JSON
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cdcl.errors import CdclError
from cdcl.vocab import METHODS

from provenance import accelerator_machine, git_commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs"
DEFAULT_DATA = "../shared/data"  # relative to the repository root, as in the configs
PROTOCOL = 2
METRICS = ("dice", "iou", "aji", "pq", "precision")
FRACTIONS = {"1-32": 1 / 32, "1-16": 1 / 16, "1-8": 1 / 8, "full": 1.0}
SPLIT_SEEDS = {"1-32": 5, "1-16": 5, "1-8": 3, "full": 3}
TRACK_SEEDS = 3  # the domain tracks and the cross-dataset rows
NOISE_RUN_SEEDS = range(5)
LABELS = {"dice": "Dice", "aji": "AJI", "pq": "PQ"}
HEADLINE_METHODS = ("supervised", "cdcl", "unimatch")
PLAN_METHODS = (*HEADLINE_METHODS, *(m for m in METHODS if m not in HEADLINE_METHODS))
"""Every method of ``cdcl.vocab.METHODS``, the headline comparison first."""
ABLATIONS = {
    "cdcl-no-contrastive": ["method.w_contr=0"],
    "cdcl-no-patch-filter": ["method.patch_filter=false"],
    "cdcl-no-bank": ["method.use_bank=false"],
    "cdcl-no-entropy": ["method.use_entropy=false"],
}
PAPER_SETTING = {"supervised-paper": "supervised", "cdcl-paper": "cdcl"}
"""Issue 19's paper setting (``preset: paper``: DenseNet-161, 320 px crops), supervised vs CDCL at 1/16 on
``TRACK_SEEDS`` splits; planned for a GPU (`--only monuseg/1-16/seed0/supervised-paper` and so on)."""
REPRESENTATION_VARIANTS = {
    "distance": ["model.instances=distance"],
    "boundary1": ["method.boundary_weight=1"],
    "binary-s1": ["model.instances=binary"],
}
"""Protocol 1 compared the default instance representation (three_class) against these; names ending in ``-old``
are protocol 1 rows of the paper's model (two classes at 1/4 resolution)."""


@dataclass(frozen=True)
class Track:
    """A dataset name of the results: where its images are (under the data root; "" is the root itself, which
    reads ``dsb2018/`` and ``dsb2018-extra/`` as one) and which configs train on it."""

    config: str  # configs/<config>_<method>.yaml
    data: str
    format: str


@dataclass(frozen=True)
class CrossTrack:
    """Runs of ``source`` evaluated on ``test`` (target images); ``in_domain``: the source's test list when it is
    not the split's own; ``mpp``: the target's microns per pixel as the key of ``resolution.json`` that holds it."""

    source: str
    target: Track
    test: str
    in_domain: str | None = None
    mpp: str | None = None
    val: str | None = None  # labeled target images apart from the test ones: they choose the switches


DSB_ALL = Track("dsb2018", "", "dsb2018")
RESOLUTION = ROOT / "splits" / "dsb2018-type" / "resolution.json"
TARGET_VAL = "splits/dsb2018-type/unlabeled-tissue.txt"
TRACKS = {
    "monuseg": Track("monuseg", "monuseg", "monuseg"),
    "dsb2018": Track("dsb2018", "dsb2018", "dsb2018"),
    "monuseg-organ": Track("monuseg", "monuseg", "monuseg"),
    "monuseg-lab": Track("monuseg", "monuseg", "monuseg"),  # no unlabeled tiles of its own: data.unlabeled_root
    "dsb2018-type": DSB_ALL,
}
CROSS = {
    "monuseg->dsb-tissue": CrossTrack(
        "monuseg", DSB_ALL, "splits/dsb2018-type/test-tissue.txt", val=TARGET_VAL
    ),  # at the images' own size: on the target validation images it beat the size-matched --mpp 0.292 (and 0.2-0.35)
    "dsb-fluo->dsb-tissue": CrossTrack(
        "dsb2018-type",
        DSB_ALL,
        "splits/dsb2018-type/test-tissue.txt",
        in_domain="splits/dsb2018-type/test-fluorescence.txt",
        val=TARGET_VAL,
    ),
}
TARGET_TILES = "runs/_data/dsb-tissue-unlabeled"
"""The lab route's unlabeled images: links to the DSB tissue images of ``TARGET_VAL``, as `cdcl tiles` would write a
lab's own tiles (a folder with images/)."""
SWITCHES = {
    "supervised-hed": ("monuseg", "supervised", ["augment.stain=hed"]),
    "supervised-reinhard": ("monuseg", "supervised", ["data.stain_norm=reinhard"]),
    "cdcl-target": ("monuseg-lab", "cdcl", [f"data.unlabeled_root={TARGET_TILES}"]),
    "cdcl-target-reinhard": (
        "monuseg-lab",
        "cdcl",
        [f"data.unlabeled_root={TARGET_TILES}", "data.stain_norm=reinhard"],
    ),
    "supervised-reinhard-hed": ("monuseg", "supervised", ["data.stain_norm=reinhard", "augment.stain=hed"]),
    "supervised-hed-scale": ("monuseg", "supervised", ["augment.stain=hed", "augment.scale=[0.5,2.0]"]),
}
"""Issue 22 on MoNuSeg 1/16 -> DSB tissue: the stain switches, and the lab's route (labels from MoNuSeg, unlabeled
images from the target), each evaluated like the plain supervised run."""
EVAL_SWITCHES = {"supervised-tta": ("supervised", ("--tta", "dihedral"))}
"""Prediction-time switches on the target images (the in-domain score stays plain): same checkpoints, other options."""
DATASETS = (*TRACKS, *CROSS)


@dataclass
class Run:
    dataset: str
    budget: str
    seed: int  # the split seed; also the run seed unless run_seed says otherwise
    name: str  # method name, ablation or noise-floor
    method: str
    overrides: list[str] = field(default_factory=list)
    run_seed: int | None = None
    shares: str | None = None  # key of the run whose folder (the same training) this one uses
    source: Run | None = None  # cross-dataset: the run whose checkpoints are evaluated
    eval_args: tuple[str, ...] = ()  # cross-dataset: extra `cdcl evaluate` options for the target images (e.g. --tta)

    @property
    def train_seed(self) -> int:
        return self.seed if self.run_seed is None else self.run_seed

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.budget}/seed{self.train_seed}/{self.name}"

    @property
    def split_dir(self) -> Path:
        if self.source is not None:
            return self.source.split_dir
        return Path("splits") / self.dataset / self.budget / f"seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        if self.source is not None:
            return self.source.run_dir
        return RUNS / (self.shares or self.key)

    @property
    def config(self) -> Path:
        return Path("configs") / f"{TRACKS[self.dataset].config}_{self.method}.yaml"


def plan() -> list[Run]:
    """The order matters: the headline comparisons first, so an interrupted sweep has them."""
    runs = [
        Run("monuseg", "1-16", 0, "noise-floor", "supervised", run_seed=r, shares="monuseg/1-16/seed0/supervised")
        if r == 0
        else Run("monuseg", "1-16", 0, "noise-floor", "supervised", run_seed=r)
        for r in NOISE_RUN_SEEDS
    ]
    for budget in ("1-16", "1-32"):
        for seed in range(SPLIT_SEEDS[budget]):
            runs.extend(Run("monuseg", budget, seed, m, m) for m in PLAN_METHODS)
    for track in ("monuseg-organ", "dsb2018-type"):
        for seed in range(TRACK_SEEDS):
            runs.extend(Run(track, "1-16", seed, m, m) for m in PLAN_METHODS)
    for name, cross in CROSS.items():
        for seed in range(TRACK_SEEDS):
            runs.extend(
                Run(name, "1-16", seed, m, m, source=Run(cross.source, "1-16", seed, m, m)) for m in PLAN_METHODS
            )
    for seed in range(TRACK_SEEDS):
        for name, (source, method, overrides) in SWITCHES.items():
            trained = Run(source, "1-16", seed, name, method, overrides)
            runs.append(Run("monuseg->dsb-tissue", "1-16", seed, name, method, source=trained))
        for name, (method, options) in EVAL_SWITCHES.items():
            trained = Run("monuseg", "1-16", seed, method, method)
            runs.append(Run("monuseg->dsb-tissue", "1-16", seed, name, method, source=trained, eval_args=options))
    for seed in range(SPLIT_SEEDS["1-8"]):
        runs.append(Run("monuseg", "full", seed, "supervised", "supervised"))
        runs.extend(Run("monuseg", "1-8", seed, m, m) for m in PLAN_METHODS)
    for seed in range(TRACK_SEEDS):
        runs.extend(Run("monuseg", "1-16", seed, n, m, ["preset=paper"]) for n, m in PAPER_SETTING.items())
    for seed in range(SPLIT_SEEDS["1-8"]):
        runs.extend(Run("monuseg", "1-8", seed, name, "cdcl", overrides) for name, overrides in ABLATIONS.items())
    for seed in range(SPLIT_SEEDS["1-8"]):
        runs.extend(Run("dsb2018", "1-8", seed, m, m) for m in PLAN_METHODS)
    return runs


def check_selector(text: str, runs: list[Run], exact: bool) -> list[str]:
    """The parts of a ``--only`` prefix or ``--key``: dataset/budget/seedN/name, each checked; CdclError (one line)
    naming the first unknown part, or a selector that matches no planned run."""
    flag = "--key" if exact else "--only"
    parts = text.rstrip("/").split("/")
    names = sorted({r.name for r in runs})
    checks = [
        ("dataset", DATASETS, lambda p: p in DATASETS),
        ("budget", tuple(FRACTIONS), lambda p: p in FRACTIONS),
        ("seed", ("seed0", "seed1", "..."), lambda p: re.fullmatch(r"seed\d+", p) is not None),
        ("method", names, lambda p: p in names if exact else any(n.startswith(p) for n in names)),
    ]
    if len(parts) > len(checks) or (exact and len(parts) < len(checks)):
        raise CdclError(f"{flag} '{text}': expected dataset/budget/seedN/name")
    for part, (what, allowed, ok) in zip(parts, checks):
        if not ok(part):
            raise CdclError(f"{flag} '{text}': unknown {what} '{part}' (expected one of {', '.join(allowed)})")
    if not any(matches(r, parts, exact) for r in runs):
        raise CdclError(f"{flag} '{text}': no planned run has this key (`--list` shows them)")
    return parts


def matches(run: Run, parts: list[str], exact: bool) -> bool:
    """Whether ``run``'s key starts with these parts: whole parts, but the name part may be a prefix."""
    key = run.key.split("/")
    whole = parts if exact or len(parts) < 4 else parts[:3]
    return key[: len(whole)] == whole and (exact or len(parts) < 4 or key[3].startswith(parts[3]))


def select(runs: list[Run], prefixes: list[str]) -> list[Run]:
    """The runs matching one of ``prefixes``, in the order of the prefixes (then plan order), so a short GPU lease
    can put the runs that matter most first."""
    if not prefixes:
        return runs
    parsed = [check_selector(p, runs, exact=False) for p in prefixes]
    rank = {r.key: min((i for i, p in enumerate(parsed) if matches(r, p, False)), default=None) for r in runs}
    return sorted((r for r in runs if rank[r.key] is not None), key=lambda r: rank[r.key])


def load_results() -> dict:
    """quality.json; CdclError when a record under ``protocol2`` is of another protocol (a file from an older sweep
    script mixed into this one: its rows would be compared as if measured alike)."""
    path = RESULTS / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("runs", {})
    results.setdefault("protocol2", {})
    for key, rec in results["protocol2"].items():
        if rec.get("protocol") != PROTOCOL:
            raise CdclError(f"record '{key}' under 'protocol2' has protocol {rec.get('protocol')}", path)
    return results


def record_result(key: str, record: dict) -> dict:
    """Merge one run into the JSON under a lock, so concurrent sweep processes never drop each other's runs;
    records of the current protocol go under ``protocol2``, never over a protocol 1 record."""
    from cdcl.io import write_json_atomic

    with open(RESULTS / ".quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        results["protocol2" if record.get("protocol") == PROTOCOL else "runs"][key] = record
        write_json_atomic(RESULTS / "quality.json", results)
    return results


def cdcl(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdcl.cli", *args]


def data_of(track: Track, data_root: str) -> str:
    return f"{data_root}/{track.data}" if track.data else data_root


def ensure_split(run: Run, data: str) -> None:
    """MoNuSeg and DSB2018 budget splits are written by ``cdcl split`` when missing; the domain tracks' are
    committed (``domain_splits.py``)."""
    if (run.split_dir / "labeled.txt").exists():
        return
    if run.dataset not in ("monuseg", "dsb2018"):
        raise CdclError("split folder missing: run benchmarks/domain_splits.py", run.split_dir)
    args = ["--labeled", str(FRACTIONS[run.budget]), "--seed", str(run.seed), "--out", str(run.split_dir)]
    subprocess.run(cdcl("split", data, "--format", run.dataset, *args), cwd=ROOT, check=True)


def train_sets(run: Run, extra: list[str]) -> list[str]:
    """The run's config overrides, less the data folder (which moves between machines)."""
    return [f"data.split_dir={run.split_dir}", f"train.seed={run.train_seed}", *run.overrides, *extra]


def config_hash(config: Path) -> str:
    """The first 16 hex digits of the config file's SHA-256 (of nothing when the file is missing)."""
    text = (ROOT / config).read_bytes() if (ROOT / config).exists() else b""
    return hashlib.sha256(text).hexdigest()[:16]


def settings(run: Run, extra: list[str]) -> dict:
    """What makes two records of one key comparable: the training config (its path and a hash of its text, so a
    changed default is not mistaken for the recorded one) and overrides, and what was evaluated."""
    trained = run.source or run
    out = {"config": str(trained.config), "config_sha256": config_hash(trained.config)}
    out |= {"overrides": train_sets(trained, extra)}
    if run.source is not None:
        out |= {"test": CROSS[run.dataset].test, "mpp": cross_mpp(run.dataset), "eval_args": list(run.eval_args)}
    return out


def cross_mpp(dataset: str) -> float | None:
    """The target images' microns per pixel of a cross-dataset track (None: evaluated at their own size)."""
    key = CROSS[dataset].mpp
    return None if key is None else json.loads(RESOLUTION.read_text())[key]


@functools.cache
def evaluate_has_mpp() -> bool:
    """Whether this checkout's ``cdcl evaluate`` takes ``--mpp`` (added by the resolution work of issue 22)."""
    done = subprocess.run(cdcl("evaluate", "--help"), cwd=ROOT, capture_output=True, text=True)
    return "--mpp" in done.stdout


def train(run: Run, extra: list[str], data_root: str) -> list[str]:
    """Train (or resume; a finished run returns at once) and return the command."""
    track = TRACKS[run.dataset]
    data = data_of(track, data_root)
    ensure_split(run, data)
    if not (ROOT / run.config).exists():
        raise CdclError("config not found (its method is not merged yet)", run.config)
    if f"data.unlabeled_root={TARGET_TILES}" in run.overrides:
        link_target_tiles(data_root)
    sets = [f"data.root={data}", *train_sets(run, extra)]
    command = cdcl(
        "train", "--config", str(run.config), *[a for s in sets for a in ("--set", s)], "--out", rel(run.run_dir)
    )
    subprocess.run(command, cwd=ROOT, check=True)
    return command


def link_target_tiles(data_root: str) -> None:
    """``TARGET_TILES``/images: one link per image of ``TARGET_VAL`` (names ``<set>/<id>`` of the DSB root)."""
    images = ROOT / TARGET_TILES / "images"
    images.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if Path(data_root).is_absolute() else ROOT / data_root
    for name in (ROOT / TARGET_VAL).read_text().split():
        subset, image_id = name.split("/")
        link = images / f"{image_id}.png"
        if not link.is_symlink():
            link.symlink_to((root / subset / "stage1_train" / image_id / "images" / f"{image_id}.png").resolve())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_absolute() else str(path)


def evaluate(
    checkpoint: Path,
    track: Track,
    test: Path | str,
    out: Path,
    data_root: str,
    mpp: float | None = None,
    options: tuple[str, ...] = (),
) -> tuple[dict, list[str], float]:
    """Metrics of one checkpoint on one test list, the command and its seconds."""
    data = data_of(track, data_root)
    command = cdcl(
        "evaluate", "--checkpoint", rel(checkpoint), "--data", data, "--format", track.format, "--split", str(test)
    )
    command += ["--out", rel(out), "--no-overlays", *options]
    if mpp is not None and evaluate_has_mpp():
        command += ["--mpp", str(mpp)]
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads((out / "metrics.json").read_text()), command, time.time() - start


def shown(command: list[str]) -> str:
    return " ".join(["cdcl", *command[3:]])


def execute(run: Run, extra: list[str], data_root: str = DEFAULT_DATA) -> dict:
    """Train (or resume) the run (a cross-dataset row: its source run), evaluate last.pt and best.pt; its record."""
    trained = run.source or run
    train_cmd = train(trained, extra, data_root)
    cross = CROSS.get(run.dataset)
    safe = run.dataset.replace("->", "-to-") + "".join(f"_{a.strip('-')}" for a in run.eval_args)
    target = cross.target if cross else TRACKS[run.dataset]
    test = cross.test if cross else run.split_dir / "test.txt"
    mpp = cross_mpp(run.dataset) if cross else None
    scores, commands, eval_s = {}, [], 0.0
    for which in ("last", "best"):
        metrics, command, seconds = evaluate(
            run.run_dir / f"{which}.pt",
            target,
            test,
            run.run_dir / f"eval_{safe}_{which}",
            data_root,
            mpp,
            run.eval_args,
        )
        scores[which] = {"mean": metrics["mean"], "pooled": metrics["pooled"]}
        commands.append(shown(command))
        eval_s += seconds
    record = {"protocol": PROTOCOL, **identity(run), "settings": settings(run, extra), **scores["last"]}
    record["best_checkpoint"] = scores["best"]
    if cross:
        in_domain = Path(cross.in_domain) if cross.in_domain else trained.split_dir / "test.txt"
        metrics, command, _ = evaluate(
            run.run_dir / "last.pt", TRACKS[cross.source], in_domain, run.run_dir / "eval_in-domain_last", data_root
        )
        record |= {"source": trained.key, "in_domain": {"mean": metrics["mean"], "pooled": metrics["pooled"]}}
        record |= {"mpp": mpp if mpp is not None and evaluate_has_mpp() else None}
        commands.append(shown(command))
        if cross.val:
            out = run.run_dir / f"eval_{safe}_val_last"
            metrics, command, _ = evaluate(
                run.run_dir / "last.pt", target, cross.val, out, data_root, mpp, run.eval_args
            )
            record["target_val"] = {"mean": metrics["mean"], "pooled": metrics["pooled"]}
            commands.append(shown(command))
    return (
        record
        | training_log(run.run_dir)
        | {
            "eval_seconds": round(eval_s, 1),
            "train_command": shown(train_cmd),
            "eval_commands": commands,
            "commit": git_commit(),
            "machine": accelerator_machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )


def identity(run: Run) -> dict:
    return {
        "dataset": run.dataset,
        "budget": run.budget,
        "seed": run.train_seed,
        "split_seed": run.seed,
        "name": run.name,
        "method": run.method,
    }


THRESHOLD_SOURCES = {
    "val/aji_tuned_last": "tuned on val for the last weights",
    "val/aji_tuned": "best.pt's (run trained before the engine tuned last.pt)",
    None: "defaults (train.tune_postprocess off)",
}


def training_log(run_dir: Path) -> dict:
    """Validation curve, training time and whose thresholds last.pt carries, from the run's metrics.jsonl."""
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "s_per_iter" in r]
    s_per_iter = sorted(r["s_per_iter"] for r in steps)
    train_s = sum(
        r["s_per_iter"] * (r["iteration"] - prev["iteration"]) for prev, r in zip([{"iteration": 0}] + steps, steps)
    )
    tuned = [k for k in ("val/aji_tuned_last", "val/aji_tuned") if any(k in r for r in log)]
    return {
        "last_thresholds": THRESHOLD_SOURCES[tuned[0] if tuned else None],
        "val_dice_curve": [(r["iteration"], r["val/dice"]) for r in log if "val/dice" in r],
        "train_seconds": round(train_s, 1),
        "median_s_per_iter": s_per_iter[len(s_per_iter) // 2] if s_per_iter else None,
    }


def claim(run: Run) -> bool:
    """Take a run for this process (several sweep processes may share the machine); False if another has it."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    lock = run.run_dir / "runner.pid"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text().strip() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)  # its owner died: take it over
            return claim(run)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def sample_sd(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {sample_sd(values):.{digits}f} (n={len(values)})"


def table_head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def hardware(rec: dict) -> str:
    return rec["machine"].get("cuda") or f"{rec['machine']['cpus']}-core CPU"


def speed(recs: list[dict]) -> str:
    """Median seconds per iteration and per run (training, then test evaluation) by hardware; GPU and CPU runs
    are never averaged together."""
    by: dict[str, list[dict]] = {}
    for r in recs:
        if r.get("median_s_per_iter"):
            by.setdefault(hardware(r), []).append(r)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    cells = []
    for hw, runs in sorted(by.items()):
        cell = f"{hw} {median([r['median_s_per_iter'] for r in runs]):.2f}"
        if all("train_seconds" in r for r in runs):
            train, evaluate = (median([r[key] for r in runs]) for key in ("train_seconds", "eval_seconds"))
            cell += f", {train:.0f} + {evaluate:.0f} s"
        cells.append(cell + f" (n={len(runs)})")
    return "; ".join(cells) or "-"


def paired_gaps(groups: dict, dataset: str = "monuseg") -> list[str]:
    """CDCL minus each baseline on the same split and seed, in Dice and AJI points: the target's test; the new
    model against the old one likewise."""
    lines = [
        "| labeled | minuend | minus | seeds | Dice points | AJI points | PQ points |",
        "|---|---|---|---|---|---|---|",
    ]
    comparisons = [
        (f"cdcl{suffix}", f"{base}{suffix}")
        for suffix in ("", "-old")
        for base in ("supervised", "mean_teacher", "fixmatch")
    ]
    comparisons += [(name, f"{name}-old") for name in METHODS]
    comparisons += [("supervised", f"supervised-{name}") for name in REPRESENTATION_VARIANTS]
    for budget in FRACTIONS:
        for minuend, base in comparisons:
            by_seed = {r["seed"]: r for r in groups.get((dataset, budget, minuend), [])}
            pairs = [(by_seed[r["seed"]], r) for r in groups.get((dataset, budget, base), []) if r["seed"] in by_seed]
            if pairs:
                gaps = {k: [100 * (c["mean"][k] - b["mean"][k]) for c, b in pairs] for k in ("dice", "aji", "pq")}
                lines.append(
                    f"| {budget.replace('-', '/')} | {minuend} | {base} | {len(pairs)} | "
                    f"{mean_sd(gaps['dice'], 1)} | {mean_sd(gaps['aji'], 1)} | {mean_sd(gaps['pq'], 1)} |"
                )
    return lines


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided t-interval of the mean of ``values`` (n - 1 degrees of freedom); the
    bounds are NaN for fewer than two values."""
    from scipy import stats

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return m, m - half, m + half


def interval_cell(values: list[float]) -> str:
    m, low, high = t_interval(values)
    return f"{m:+.1f} (n=1)" if math.isnan(low) else f"{m:+.1f} [{low:+.1f}, {high:+.1f}]"


def group(records: dict) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for rec in records.values():
        groups.setdefault((rec["dataset"], rec["budget"], rec["name"]), []).append(rec)
    return groups


def rank(ds: str, budget: str, name: str = "") -> tuple:
    """Table order: dataset as planned, budget from the smallest, method in plan order (others after, by name)."""
    order = (DATASETS, tuple(FRACTIONS), PLAN_METHODS)
    return (*(o.index(v) if v in o else len(o) for o, v in zip(order, (ds, budget, name))), name)


def ordered(groups: dict) -> list[tuple[tuple[str, str, str], list[dict]]]:
    return sorted(groups.items(), key=lambda kv: rank(*kv[0]))


def score(rec: dict, metric: str, which: str = "last") -> float:
    return (rec if which == "last" else rec["best_checkpoint"])["mean"][metric]


def v2_scores(groups: dict) -> list[str]:
    lines = table_head(
        "dataset", "labeled", "method", "Dice", "AJI", "PQ", "Dice (best.pt)", "AJI (best.pt)", "s/iter, s per run"
    )
    for (ds, budget, name), recs in ordered(groups):
        if ds in CROSS:
            continue
        cells = [mean_sd([score(r, k) for r in recs]) for k in LABELS]
        cells += [mean_sd([score(r, k, "best") for r in recs]) for k in ("dice", "aji")]
        lines.append(f"| {ds} | {budget.replace('-', '/')} | {name} | " + " | ".join(cells) + f" | {speed(recs)} |")
    return lines


def pairs(groups: dict, ds: str, budget: str, minuend: str, base: str) -> list[tuple[dict, dict]]:
    by_seed = {r["seed"]: r for r in groups.get((ds, budget, minuend), [])}
    return [(by_seed[r["seed"]], r) for r in groups.get((ds, budget, base), []) if r["seed"] in by_seed]


def gap_points(matched: list[tuple[dict, dict]], metric: str) -> list[float]:
    """Per pair (minuend, base), the difference of the last-iteration scores in points."""
    return [100 * (score(a, metric) - score(b, metric)) for a, b in matched]


def v2_gaps(groups: dict) -> list[str]:
    """Each semi-supervised method (and each cross-dataset switch) minus supervised, and CDCL minus UniMatch,
    paired on dataset, budget, split and seed; in points of the last-iteration score."""
    lines = table_head("dataset", "labeled", "method", "minus", "pairs", "Dice points", "AJI points", "PQ points")
    comparisons = [(m, "supervised") for m in PLAN_METHODS[1:]] + [("cdcl", "unimatch")]
    comparisons += [(name, "supervised") for name in [*SWITCHES, *EVAL_SWITCHES]]
    comparisons += [("cdcl-target-reinhard", "supervised-reinhard")]  # the lab route beside its own baseline
    comparisons += [("supervised", "supervised-nonorm")]  # in-domain cost of the Reinhard default (issue 22)
    comparisons += [("cdcl-paper", "supervised-paper")]
    budgets = sorted({(ds, b) for ds, b, _ in groups}, key=lambda k: rank(*k))
    for ds, budget in budgets:
        for minuend, base in comparisons:
            matched = pairs(groups, ds, budget, minuend, base)
            if matched:
                cells = [interval_cell(gap_points(matched, k)) for k in LABELS]
                lines.append(
                    f"| {ds} | {budget.replace('-', '/')} | {minuend} | {base} | {len(matched)} | "
                    + " | ".join(cells)
                    + " |"
                )
    return lines


def noise_floor(groups: dict) -> str:
    recs = groups.get(("monuseg", "1-16", "noise-floor"), [])
    if len(recs) < 2:
        return f"Noise floor: {len(recs)} of {len(NOISE_RUN_SEEDS)} runs so far."
    sds = ", ".join(f"{label} {sample_sd([100 * score(r, k) for r in recs]):.2f}" for k, label in LABELS.items())
    seeds = ", ".join(str(s) for s in sorted(r["seed"] for r in recs))
    current = config_hash(Run("monuseg", "1-16", 0, "noise-floor", "supervised").config)
    stale = any(r["settings"].get("config_sha256") != current for r in recs)
    return (
        f"Noise floor (supervised, MoNuSeg 1/16, split seed 0, run seeds {seeds}; last iteration): standard "
        f"deviation in points: {sds} (n={len(recs)})"
        + ("; trained with an earlier version of the config (before a default changed)." if stale else ".")
    )


def v2_cross(groups: dict) -> list[str]:
    lines = table_head(
        "dataset", "labeled (source)", "method", "seeds", "in-domain Dice", "in-domain AJI", "target Dice",
        "target AJI", "target PQ", "Dice drop (points)", "--mpp", "target val AJI",
    )  # fmt: skip
    for (ds, budget, name), recs in ordered(groups):
        if ds not in CROSS:
            continue
        domain = [mean_sd([r["in_domain"]["mean"][k] for r in recs]) for k in ("dice", "aji")]
        target = [mean_sd([score(r, k) for r in recs]) for k in LABELS]
        drop = interval_cell([100 * (r["in_domain"]["mean"]["dice"] - score(r, "dice")) for r in recs])
        mpp = sorted({str(r.get("mpp")) for r in recs})
        val = mean_sd([r["target_val"]["mean"]["aji"] for r in recs if "target_val" in r])
        lines.append(
            f"| {ds} | {budget.replace('-', '/')} | {name} | {len(recs)} | "
            + " | ".join(domain + target)
            + f" | {drop} | {', '.join(mpp)} | {val} |"
        )
    return lines


def v2_runs(records: dict) -> list[str]:
    lines = ["| key | machine | last.pt thresholds | train command | evaluation commands |", "|---|---|---|---|---|"]
    for key in sorted(records):
        rec = records[key]
        evals = "<br>".join(f"`{c}`" for c in rec["eval_commands"])
        lines.append(f"| {key} | {hardware(rec)} | {rec['last_thresholds']} | `{rec['train_command']}` | {evals} |")
    return lines


def report(results: dict) -> None:
    """quality.md (protocol 2: scores, noise floor, paired gaps with intervals, cross-dataset, runs; then protocol
    1 as it was), the budget plots (quality.png: protocol 2; quality_protocol1.png) and the gap picture."""
    v2 = group(results.get("protocol2", {}))
    v1 = group(results["runs"])
    sections = []
    if v2:
        sections += [
            "## Protocol 2\n\nPer-image mean over the test images of the model at the last iteration (last.pt: the EMA "
            "teacher, thresholds tuned on val for it); best.pt (best on val) beside it. Mean ± sample sd over seeds "
            "(n = seeds).\n\n" + "\n".join(v2_scores(v2)),
            noise_floor(v2),
            "Paired gaps (same dataset, budget, split and seed), last iteration, in points: mean of the per-seed "
            "differences [95% t-interval over seeds, n - 1 degrees of freedom]. Compare them with the noise floor's "
            "sd above.\n\n" + "\n".join(v2_gaps(v2)),
            "Cross-dataset (the source track's runs evaluated on the target test images; in-domain: the same "
            "last.pt on the source's test images; drop: in-domain minus target Dice [95% t-interval]).\n\n"
            + "\n".join(v2_cross(v2)),
            "Machine and commands of every protocol 2 row:\n\n" + "\n".join(v2_runs(results["protocol2"])),
        ]
    sections += [
        "## Protocol 1\n\nRecords from before protocol 2 (best-on-validation checkpoint, 3 seeds), kept as they "
        "were.\n\n" + v1_tables(v1)
    ]
    (RESULTS / "quality.md").write_text("\n\n".join(sections) + "\n")
    if any(ds == "monuseg" for ds, _, _ in v2):
        plot(v2, "last iteration", "quality.png")
    if any(ds == "monuseg" for ds, _, _ in v1):
        plot(v1, "protocol 1, best on val", "quality_protocol1.png")
    if any(ds in CROSS for ds, _, _ in v2):
        plot_cross(v2)
    plot_gaps(v2)


def v1_tables(groups: dict) -> str:
    """Protocol 1's table (mean ± sd over seeds, best-on-val checkpoint) and its paired gaps, as it was written."""
    order = {b: i for i, b in enumerate(FRACTIONS)}
    lines = [
        "| dataset | labeled | method | "
        + " | ".join(METRICS)
        + " | best val Dice | s/iter, s per run (train + test) by hardware |",
        "|---|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for (ds, budget, name), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9), kv[0][2])):
        cells = [mean_sd([r["mean"][k] for r in recs]) for k in METRICS]
        best_val = mean_sd([max(v for _, v in r["val_dice_curve"]) for r in recs if r["val_dice_curve"]])
        lines.append(
            f"| {ds} | {budget.replace('-', '/')} | {name} | " + " | ".join(cells) + f" | {best_val} | {speed(recs)} |"
        )
    return (
        "Per-image mean over the test images; ± is the sample standard deviation over seeded splits "
        "(n = number of seeds). 'best val Dice' is the checkpoint kept (chosen on the validation images).\n\n"
        + "\n".join(lines)
        + "\n\nPaired on split and seed (mean ± sd of the per-seed differences):\n\n"
        + "\n\n".join(f"{ds}:\n\n" + "\n".join(paired_gaps(groups, ds)) for ds in ("monuseg", "dsb2018"))
    )


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported here: only the report draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=110)
    pyplot().close(fig)


def plot(groups: dict, which: str, out: str) -> None:
    """Dice and AJI against the MoNuSeg label budget, one line per method, 95% t-interval bars over seeds."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [*PLAN_METHODS, *(f"{m}-old" for m in PLAN_METHODS)]
    names = [n for n in names if any(("monuseg", b, n) in groups for b in FRACTIONS)]
    for ax, metric in zip(axes, ("dice", "aji")):
        for i, name in enumerate(names):
            dodge = 2 ** (0.05 * (i - (len(names) - 1) / 2))  # side by side at each budget, so the bars stay readable
            xs, ys, errs = [], [], []
            for budget, frac in FRACTIONS.items():
                recs = groups.get(("monuseg", budget, name), [])
                if recs:
                    m, low, _ = t_interval([score(r, metric) for r in recs])
                    xs, ys, errs = xs + [frac * dodge], ys + [m], errs + [0.0 if math.isnan(low) else m - low]
            style = ":" if name.endswith("-old") else "-"
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name, linestyle=style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(FRACTIONS.values()), [b.replace("-", "/") for b in FRACTIONS])
        ax.minorticks_off()
        ax.set_xlabel("labeled fraction of MoNuSeg training tiles")
        ax.set_ylabel(metric.upper() if metric != "dice" else "Dice")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"MoNuSeg test images ({which}; mean and 95% t-interval over seeded splits)")
    save_figure(fig, out)


def plot_cross(groups: dict) -> None:
    """Per cross-dataset track, target Dice and AJI of every row (bars: mean, 95% t-interval over seeds), the
    in-domain score of the same checkpoints as a marker: what each switch buys on another lab's images."""
    plt = pyplot()
    rows = [(key, recs) for key, recs in ordered(groups) if key[0] in CROSS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.5), sharey=True)
    labels = [f"{ds}: {name} (n={len(recs)})" for (ds, _, name), recs in rows]
    for ax, metric in zip(axes, ("dice", "aji")):
        for y, (_, recs) in enumerate(rows):
            m, low, _ = t_interval([score(r, metric) for r in recs])
            ax.barh(y, m, xerr=None if math.isnan(low) else m - low, capsize=3, color="tab:blue", alpha=0.7)
            domain = sum(r["in_domain"]["mean"][metric] for r in recs) / len(recs)
            ax.plot(domain, y, "k|", markersize=14, label="in-domain" if y == 0 else None)
        ax.set_xlabel(f"target {LABELS[metric]}")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.suptitle("Another lab's images: trained on the source, tested on the target (last iteration)")
    save_figure(fig, "quality_cross.png")


def plot_gaps(groups: dict) -> None:
    """Each semi-supervised method minus supervised (paired by split and seed, last iteration), per dataset and
    budget: the mean gap in Dice and AJI points with its 95% t-interval, zero and the issue's +2 / +3 AJI targets
    marked. The answer to "will my unlabeled tiles help?" in one picture."""
    plt = pyplot()
    rows = []
    for ds, budget in sorted({(ds, b) for ds, b, _ in groups if ds in TRACKS}, key=lambda k: rank(*k)):
        for method in PLAN_METHODS[1:]:
            matched = pairs(groups, ds, budget, method, "supervised")
            if matched:
                rows.append((f"{ds} {budget.replace('-', '/')}: {method} (n={len(matched)})", matched))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(rows) + 1.6), sharey=True)
    for ax, metric in zip(axes, ("dice", "aji")):
        for y, (_, matched) in enumerate(rows):
            m, low, _ = t_interval(gap_points(matched, metric))
            ax.errorbar(m, y, xerr=None if math.isnan(low) else m - low, fmt="o", capsize=3, color="tab:blue")
        ax.axvline(0, color="k", linewidth=1)
        if metric == "aji":
            ax.axvline(2, color="tab:green", linestyle="--", linewidth=1, label="target +2 (MoNuSeg)")
            ax.axvline(3, color="tab:red", linestyle=":", linewidth=1, label="target +3 (domain tracks)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(f"{LABELS[metric]} points, method minus supervised (paired)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(rows)), [label for label, _ in rows])
    axes[0].invert_yaxis()
    fig.suptitle("What the unlabeled tiles buy: paired gaps, mean and 95% t-interval over seeds (last iteration)")
    save_figure(fig, "quality_gaps.png")


def refuse_other_settings(runs: list[Run], results: dict, extra: list[str]) -> None:
    """Before anything runs: a planned key already recorded with other settings would overwrite a result that
    is not comparable; CdclError naming the first such key."""
    for run in runs:
        rec = results["protocol2"].get(run.key)
        if rec is not None and rec["settings"] != settings(run, extra):
            raise CdclError(
                f"'{run.key}' is recorded with other settings ({json.dumps(rec['settings'])}); "
                "use other names or drop --set",
                RESULTS / "quality.json",
            )


def sweep(runs: list[Run], extra: list[str], data_root: str) -> dict:
    results = load_results()
    for run in runs:
        if run.key in load_results()["protocol2"] or not claim(run):
            continue
        print(f"=== {run.key}", flush=True)
        try:
            record = execute(run, extra, data_root)
        except subprocess.CalledProcessError as exc:  # one failed run must not end the sweep
            print(f"!!! {run.key} failed: {exc}", flush=True)
            continue
        except CdclError as exc:  # e.g. a method whose configs are not merged yet
            print(f"!!! {run.key} skipped: {exc}", flush=True)
            continue
        finally:
            (run.run_dir / "runner.pid").unlink(missing_ok=True)
        results = record_result(run.key, record)
        report(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run keys starting with this prefix (repeatable; runs follow the order of the prefixes)",
    )
    parser.add_argument("--key", action="append", default=[], help="run exactly this key (repeatable, in this order)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    parser.add_argument("--data-root", default=DEFAULT_DATA, help="folder holding monuseg/ and dsb2018*/")
    args = parser.parse_args()
    try:
        planned = plan()
        runs = select(planned, args.only)
        if args.key:
            for key in args.key:
                check_selector(key, planned, exact=True)
            by_key = {r.key: r for r in planned}
            runs = [by_key[k] for k in args.key]
        results = load_results()
        if args.list:
            for r in runs:
                print(("done  " if r.key in results["protocol2"] else "todo  ") + r.key)
            return
        RESULTS.mkdir(parents=True, exist_ok=True)
        if not args.report:
            refuse_other_settings(runs, results, args.set)
            results = sweep(runs, args.set, args.data_root)
        report(results)
    except CdclError as err:
        print(f"quality.py: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
