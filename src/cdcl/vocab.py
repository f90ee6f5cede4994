"""The named choices users make, each defined once: the config, the CLI choices, the error messages, the method
registry, the dataset readers and the benchmarks all read them from here.

A ``Literal`` gives the type checker the names; the tuple beside it (``get_args``) is what code iterates and
what error messages list. This module imports nothing, so the CLI can offer the choices without loading torch.
"""

from __future__ import annotations

from typing import Literal, get_args

MethodName = Literal["supervised", "mean_teacher", "fixmatch", "cdcl"]
METHODS: tuple[str, ...] = get_args(MethodName)

DatasetFormat = Literal["folder", "monuseg", "dsb2018"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)

OptimizerName = Literal["adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

ScheduleName = Literal["poly", "cosine", "constant"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

AnchorSource = Literal["student", "teacher"]  # method.anchor_source: whose labels and ratios the anchors take
ANCHOR_SOURCES: tuple[str, ...] = get_args(AnchorSource)

NonfiniteAction = Literal["stop", "skip"]  # train.on_nonfinite: what a NaN/inf loss does
NONFINITE_ACTIONS: tuple[str, ...] = get_args(NonfiniteAction)

EvalModel = Literal["ema", "student"]  # train.eval_model: the weights validated and saved as best.pt
EVAL_MODELS: tuple[str, ...] = get_args(EvalModel)

SelectBy = Literal["aji", "dice"]  # train.select_by: the validation score that picks best.pt
SELECT_BY: tuple[str, ...] = get_args(SelectBy)


def spoken(names: tuple[str, ...], quote: str = "") -> str:
    """``names`` as a message lists them: ``a, b or c`` (each between ``quote``)."""
    quoted = [f"{quote}{name}{quote}" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


TtaMode = Literal["none", "flips", "dihedral"]  # infer.tta / --tta: which flips and 90-degree rotations are averaged
TTA_MODES: tuple[str, ...] = get_args(TtaMode)
