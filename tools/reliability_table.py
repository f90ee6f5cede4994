"""Render docs/RELIABILITY.md from the cases the reliability and security suites record.

    rm -f /tmp/cases.jsonl
    CDCL_RELIABILITY_JSON=/tmp/cases.jsonl pytest tests/cli/test_bad_inputs.py tests/cli/test_interrupts.py \\
        tests/training/test_numerics.py tests/cli/test_security.py tests/cli/test_lab_slides.py
    python tools/reliability_table.py /tmp/cases.jsonl docs/RELIABILITY.md

Each test appends one JSON line per case (see ``tests/helpers/cli_cases.py``): suite, command, input, expected outcome,
exit code, the one-line message and, for some, an observed outcome. The table is only as good as the run it
comes from: generate it from a passing run.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

SUITES = {
    "bad_inputs": (
        "Bad inputs",
        "tests/cli/test_bad_inputs.py: broken files, configs, lists, checkpoints and output folders "
        "through the real CLI. Refusals must exit 2 with stderr's last line `cdcl COMMAND: error: PATH: "
        "PROBLEM`, no traceback, and no partial output; unusual but valid inputs must work. `data check` "
        "lists every problem on stdout instead (and exits 2).",
    ),
    "interrupts": (
        "Interrupted runs",
        "tests/cli/test_interrupts.py: `cdcl train` and `cdcl predict-wsi` killed with "
        "SIGKILL (no cleanup possible), then re-run with the same command.",
    ),
    "numerics": (
        "Numerical faults",
        "tests/training/test_numerics.py: NaN injected into batches and statistics during "
        "training (in-process), and CDCL's loss terms on degenerate unlabeled batches.",
    ),
    "lab_slides": (
        "Another lab's slides",
        "tests/cli/test_lab_slides.py: resolution (`--mpp`, `--mpp auto`) and test-time augmentation (`--tta`) "
        "options of `predict` and `evaluate` that cannot apply to the checkpoint or the images.",
    ),
    "security": (
        "Security",
        "tests/cli/test_security.py: files from untrusted sources. For the resource attacks, the "
        "CPU time and peak memory of the refusing process are shown next to those of the same command on "
        "genuine input (the test allows at most 3 CPU s and 100 MB more).",
    ),
}
COMMAND_ORDER = [
    "data check",
    "split",
    "train",
    "train (in-process)",
    "CDCL.losses",
    "evaluate",
    "predict",
    "predict-wsi",
]

FIXED = [
    "`predict-wsi` with `--workers` > 0 killed as a whole process group (SIGKILL to the group, as a container "
    "stop does): the shared-memory blocks of the tiles in flight stayed in /dev/shm, which is memory, until reboot "
    "(src/cdcl/wsi/handoff.py: blocks are named after their process; the next run removes those of dead processes).",
    "`train`: the progress bar was left open when an error stopped the run, so stderr's last line was the bar, "
    "not the error (src/cdcl/training/engine.py: the bar is a context manager).",
    "`train` with `data.num_workers` > 0 (and `predict-wsi` with `--workers` > 0): an error in a DataLoader worker "
    "came back as one huge line holding the worker's whole traceback (src/cdcl/errors.py `from_workers`, used by "
    "src/cdcl/data/loaders.py and src/cdcl/wsi/pipeline.py, restores the original `path: problem`).",
    "`train` with `train.on_nonfinite=skip`: the skipped forward pass had already put NaN into the batch-norm "
    "statistics (and, for CDCL, into the memory bank), which were then saved in every later checkpoint; and the "
    "finite-weights check before a save ignored buffers (src/cdcl/training/engine.py: both restored on a skipped "
    "step; every "
    "float tensor checked before a save).",
    "`train` re-run after a kill that cut a metrics.jsonl line in half crashed with a JSON traceback "
    "(src/cdcl/training/engine.py: a last line without newline is dropped).",
    "`train` and `predict-wsi` killed mid-write left hidden temporary files (up to a checkpoint's size) behind for "
    "good (src/cdcl/io.py `remove_leftover_temporaries`, called on resume and before the slide outputs are written).",
    "`train` with `model.pretrained=true` offline, or a weights file that is not weights: a traceback from timm or "
    "the Hugging Face hub (src/cdcl/models/unet.py: one line naming `model.pretrained`).",
    "`train` with a missing or empty `data.root` / `data.split_dir`: the message did not name the config key, and an "
    "empty `data.root` silently meant the current folder (src/cdcl/training/engine.py `config_folder`: resolved, "
    "checked, "
    "key named).",
    'A random-bytes, truncated or legacy-pickle checkpoint was reported as "could run code" after being handed '
    "to the unpickler (src/cdcl/checkpoint.py: anything that is not a zip archive is refused before unpickling).",
    "`predict-wsi` on a truncated or damaged TIFF: a traceback from tiffslide/zarr, then asyncio's tracebacks of the "
    "abandoned reads at exit (src/cdcl/wsi/readers.py: backend read errors become one line; the abandoned reads are "
    "silenced).",
    "`data check` errors were labelled `cdcl data: error:` (src/cdcl/cli.py: `cdcl data check: error:`).",
]


def load_cases(path: Path) -> list[dict]:
    """Cases in recorded order; a case recorded twice (a suite run twice into one file) keeps its last record."""
    cases: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            case = json.loads(line)
            key = (case["suite"], case["case"], case["command"], case["input"])
            cases.pop(key, None)
            cases[key] = case
    return list(cases.values())


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def exit_text(code: int | None) -> str:
    if code is None:
        return "-"
    return "SIGKILL" if code == -9 else str(code)


def table(cases: list[dict]) -> list[str]:
    order = {name: i for i, name in enumerate(COMMAND_ORDER)}
    rows = sorted(enumerate(cases), key=lambda ic: (order.get(ic[1]["command"], len(order)), ic[0]))
    lines = ["| # | Command | Input | Expected | Exit | Message | Observed |", "|---|---|---|---|---|---|---|"]
    for number, (_, case) in enumerate(rows, start=1):
        lines.append(
            f"| {number} | {cell(case['command'])} | {cell(case['input'])} | {cell(case['expected'])} | "
            f"{exit_text(case['exit_code'])} | {cell(case['message'])} | {cell(case['outcome'])} |"
        )
    return lines


def render(cases: list[dict]) -> str:
    by_suite = {suite: [c for c in cases if c["suite"] == suite] for suite in SUITES}
    commands = Counter(c["command"] for c in cases)
    out = [
        "# Reliability and security: every case tried",
        "",
        "Generated by `tools/reliability_table.py` from a run of the suites (see its docstring to regenerate); "
        "do not edit by hand. Paths are shown relative to each test's temporary folder.",
        "",
        f"**{len(cases)} cases**: " + ", ".join(f"{len(by_suite[s])} {SUITES[s][0].lower()}" for s in SUITES) + ". "
        "By command: " + ", ".join(f"{name} {n}" for name, n in sorted(commands.items(), key=lambda kv: -kv[1])) + ".",
        "",
        "## Found broken and fixed while building the suite",
        "",
        *[f"- {item}" for item in FIXED],
        "",
    ]
    for suite, (title, about) in SUITES.items():
        out += [f"## {title} ({len(by_suite[suite])} cases)", "", about, "", *table(by_suite[suite]), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=Path, help="JSON lines written by the suites (CDCL_RELIABILITY_JSON)")
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/RELIABILITY.md"))
    args = parser.parse_args()
    cases = load_cases(args.cases)
    unknown = sorted({c["suite"] for c in cases} - set(SUITES))
    if unknown:
        parser.error(f"cases from unknown suites: {', '.join(unknown)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(cases))
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
