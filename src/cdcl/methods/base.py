"""What every method shares: the supervised term, the warm-up/ramp schedule, the batch split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdcl.losses import sigmoid_rampup


class Method:
    """Base class. ``losses`` returns named scalar tensors, always including ``total``."""

    uses_unlabeled = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def unlabeled_active(self, step: int) -> bool:
        """Unlabeled terms start after ``warmup_iters`` supervised-only steps (PAPER.md: epoch_semi)."""
        return self.uses_unlabeled and step >= self.cfg.warmup_iters

    def ramp(self, step: int) -> float:
        """Sigmoid ramp-up of the consistency weight, counted from the end of the warm-up."""
        return sigmoid_rampup(step - self.cfg.warmup_iters, self.cfg.ramp_iters)

    def supervised_only(self, student: nn.Module, labeled: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss of a warm-up step (and of the supervised baseline): labeled cross-entropy alone."""
        out, _ = student_forward(student, labeled, None)
        sup = supervised_loss(out["logits"], labeled["target"])
        return {"total": sup, "sup": sup}

    def losses(self, student: nn.Module, teacher: nn.Module, labeled: dict[str, Tensor],
               unlabeled: dict[str, Tensor] | None, step: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def supervised_loss(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), target)


def student_forward(student: nn.Module, labeled: dict[str, Tensor], extra: Tensor | None, embeddings: bool = False
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """One student pass over labeled images and (optionally) unlabeled strong views, split back apart.

    A single concatenated batch is cheaper than two passes and lets BatchNorm see both distributions.
    """
    x = labeled["image"] if extra is None else torch.cat([labeled["image"], extra])
    out = student(x, embeddings=embeddings)
    n = labeled["image"].shape[0]
    lab = {k: v[:n] for k, v in out.items()}
    unl = None if extra is None else {k: v[n:] for k, v in out.items()}
    return lab, unl


@torch.no_grad()
def teacher_forward(model: nn.Module, x: Tensor, embeddings: bool = False) -> dict[str, Tensor]:
    """Pseudo-label pass: eval mode (no dropout, running BN statistics), no gradient."""
    was_training = model.training
    model.eval()
    out = model(x, embeddings=embeddings)
    model.train(was_training)
    return {k: v.float() for k, v in out.items()}
