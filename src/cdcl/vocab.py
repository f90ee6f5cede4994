"""The named choices users make, each defined once: the config, the CLI choices, the error messages, the method
registry, the dataset readers and the benchmarks all read them from here.

A ``Literal`` gives the type checker the names; the tuple beside it (``get_args``) is what code iterates and
what error messages list. This module imports nothing, so the CLI can offer the choices without loading torch.
"""

from __future__ import annotations

from typing import Literal, get_args

MethodName = Literal["supervised", "mean_teacher", "fixmatch", "cdcl", "unimatch"]
METHODS: tuple[str, ...] = get_args(MethodName)
STRONG_VIEWS: tuple[str, ...] = ("strong", "strong2")  # unlabeled batch keys of the strong views, drawn in order

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

StainNorm = Literal["none", "macenko", "reinhard"]  # data.stain_norm: colour normalisation to the training stain
STAIN_NORMS: tuple[str, ...] = get_args(StainNorm)

StainAugment = Literal["none", "hed"]  # augment.stain: the extra stain/appearance jitter of the labeled view
STAIN_AUGMENTS: tuple[str, ...] = get_args(StainAugment)


def spoken(names: tuple[str, ...], quote: str = "") -> str:
    """``names`` as a message lists them: ``a, b or c`` (each between ``quote``)."""
    quoted = [f"{quote}{name}{quote}" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


TtaMode = Literal["none", "flips", "dihedral"]  # infer.tta / --tta: which flips and 90-degree rotations are averaged
TTA_MODES: tuple[str, ...] = get_args(TtaMode)

CohortStatus = Literal["finished", "running", "failed", "missing"]  # a slide's row in `cdcl cohort`'s table
COHORT_STATUSES: tuple[str, ...] = get_args(CohortStatus)
