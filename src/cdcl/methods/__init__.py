"""Training methods: each turns a labeled (and unlabeled) batch into named losses (``losses`` holds the loss
functions, on tensors only); the engine (``cdcl.training``) does the rest. Methods may import ``instances``
(representation losses) and the top-level utilities, never ``data``, ``models``, ``training``, ``inference``,
``wsi`` or ``commands``."""

from __future__ import annotations

from cdcl.methods.base import Method
from cdcl.methods.cdcl import CDCL
from cdcl.methods.fixmatch import FixMatch
from cdcl.methods.mean_teacher import MeanTeacher
from cdcl.methods.supervised import Supervised
from cdcl.methods.unimatch import UniMatch
from cdcl.vocab import METHODS

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Supervised, MeanTeacher, FixMatch, CDCL, UniMatch)}
if tuple(REGISTRY) != METHODS:  # the config, the CLI and the benchmarks offer cdcl.vocab.METHODS
    raise ImportError(f"method classes {tuple(REGISTRY)} differ from cdcl.vocab.METHODS {METHODS}")


def build_method(cfg, representation: str = "binary") -> Method:
    """``cfg`` is a ``cdcl.config.MethodConfig``; ``representation`` the model's instance representation."""
    return REGISTRY[cfg.name](cfg, representation)


__all__ = ["Method", "REGISTRY", "build_method"]
