"""What every method shares: the supervised term, the warm-up/ramp schedule, the batch split."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cdcl.instances.representations import class_logits, distance_consistency, foreground_logits
from cdcl.instances.representations import supervised_loss as representation_loss
from cdcl.methods.losses import confident_cross_entropy, sigmoid_rampup


class Method:
    """Base class. ``losses`` returns named scalar tensors, always including ``total``."""

    name: ClassVar[str]  # the config's method.name: one of cdcl.vocab.METHODS (the registry is keyed by it)
    uses_unlabeled = False
    strong_views = 1  # strong views per unlabeled image the loader makes (batch keys: cdcl.vocab.STRONG_VIEWS)

    def __init__(self, cfg: Any, representation: str = "binary") -> None:
        self.cfg, self.representation = cfg, representation

    def unlabeled_active(self, step: int) -> bool:
        """Unlabeled terms start after ``warmup_iters`` supervised-only steps (PAPER.md: epoch_semi)."""
        return self.uses_unlabeled and step >= self.cfg.warmup_iters

    def ramp(self, step: int) -> float:
        """Sigmoid ramp-up of the consistency weight, counted from the end of the warm-up."""
        return sigmoid_rampup(step - self.cfg.warmup_iters, self.cfg.ramp_iters)

    def supervised_only(self, student: nn.Module, labeled: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss of a warm-up step (and of the supervised baseline): labeled cross-entropy alone."""
        out, _ = student_forward(student, labeled, None)
        sup = self.supervised_loss(out["logits"], labeled)
        return {"total": sup, "sup": sup}

    def supervised_loss(self, logits: Tensor, labeled: dict[str, Tensor]) -> Tensor:
        """Cross-entropy on the labeled classes (plus the distance regression of that representation)."""
        return representation_loss(logits, labeled, self.representation, self.cfg.w_distance, self.cfg.boundary_weight)

    def consistency_logits(self, logits: Tensor) -> Tensor:
        """The class logits the consistency terms compare: every class, or with ``instance_consistency`` off,
        only nucleus vs background (a three-class head's boundary channel then gets no unlabeled signal)."""
        classes = class_logits(logits.float(), self.representation)
        return classes if self.cfg.instance_consistency else foreground_logits(classes)

    def confident_consistency(self, student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the student against the teacher's confident classes, plus (distance representation,
        ``instance_consistency``) the squared error of the distance maps where the teacher is confident."""
        t_probs = self.consistency_logits(teacher_logits).softmax(dim=1)
        cons, confident = confident_cross_entropy(self.consistency_logits(student_logits), t_probs, self.cfg.threshold)
        terms = {"cons": cons, "stat/confident": confident}
        if self.representation == "distance" and self.cfg.instance_consistency:
            terms["cons_dist"] = distance_consistency(
                student_logits, teacher_logits, self.teacher_confident(teacher_logits)
            )
        return terms

    def teacher_confident(self, teacher_logits: Tensor) -> Tensor:
        """Pixels whose nucleus-vs-background call the teacher makes with confidence above ``threshold``: the
        distance map is compared there (confident background included: its target distance is 0)."""
        probs = foreground_logits(class_logits(teacher_logits.float(), self.representation)).softmax(dim=1)
        return probs.amax(dim=1) > self.cfg.threshold

    def losses(
        self,
        student: nn.Module,
        teacher: nn.Module,
        labeled: dict[str, Tensor],
        unlabeled: dict[str, Tensor] | None,
        step: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def student_forward(
    student: nn.Module, labeled: dict[str, Tensor], extra: Tensor | None, embeddings: bool = False, **model_kwargs
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """One student pass over labeled images and (optionally) unlabeled strong views, split back apart;
    ``model_kwargs`` go to the model (UniMatch's feature perturbation).

    A single concatenated batch is cheaper than two passes and lets BatchNorm see both distributions.
    """
    x = labeled["image"] if extra is None else torch.cat([labeled["image"], extra])
    out = student(x, embeddings=embeddings, **model_kwargs)
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
