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


def spoken(names: tuple[str, ...], quote: str = "") -> str:
    """``names`` as a message lists them: ``a, b or c`` (each between ``quote``)."""
    quoted = [f"{quote}{name}{quote}" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
