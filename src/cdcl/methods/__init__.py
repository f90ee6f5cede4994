"""Training methods: each turns a labeled (and unlabeled) batch into named losses; the engine does the rest."""

from __future__ import annotations

from cdcl.methods.base import Method
from cdcl.methods.cdcl import CDCL
from cdcl.methods.fixmatch import FixMatch
from cdcl.methods.mean_teacher import MeanTeacher
from cdcl.methods.supervised import Supervised

REGISTRY: dict[str, type[Method]] = {"supervised": Supervised, "mean_teacher": MeanTeacher, "fixmatch": FixMatch, "cdcl": CDCL}


def build_method(cfg, representation: str = "binary") -> Method:
    """``cfg`` is a ``cdcl.config.MethodConfig``; ``representation`` the model's instance representation."""
    return REGISTRY[cfg.name](cfg, representation)


__all__ = ["Method", "REGISTRY", "build_method"]
