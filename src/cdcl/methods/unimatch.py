"""UniMatch (Yang et al., CVPR 2023): the model's confident weak-view pseudo-labels supervise two strong views
(each its own photometric draw and CutMix box) and a feature-perturbation stream (the weak view decoded from
encoder features with whole channels dropped).

As in this repo's FixMatch the pseudo-labeller is the model itself in eval mode (no dropout, running BN
statistics), not the EMA teacher; the confident cross-entropy is averaged over the confident pixels (UniMatch:
over all pixels); and the unlabeled weight is ``w_cons`` from the end of the warm-up, without ramp. The
image-level term (mean over the strong views) and the feature-level term weigh 1/2 each, as in UniMatch; with
the feature stream off (``feature_dropout`` 0) the image-level term weighs 1, so one strong view without CutMix
is FixMatch exactly. The distance map of that representation is compared like FixMatch's, in every stream.
"""

from __future__ import annotations

import torch

from cdcl.methods.base import Method, student_forward, teacher_forward
from cdcl.methods.cutmix import cutmix, cutmix_boxes
from cdcl.vocab import STRONG_VIEWS


class UniMatch(Method):
    name = "unimatch"

    uses_unlabeled = True

    def __init__(self, cfg, representation: str = "binary") -> None:
        super().__init__(cfg, representation)
        self.strong_views = cfg.strong_views

    def losses(self, student, teacher, labeled, unlabeled, step):
        cfg = self.cfg
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        weak = unlabeled["weak"]
        target = teacher_forward(student, weak)["logits"]
        generator = torch.Generator().manual_seed(1_000_003 * step + 29)  # seeded by the step: resume draws alike
        boxes = [cutmix_boxes(len(weak), weak.shape[-2:], cfg.cutmix_prob, generator) for _ in range(self.strong_views)]
        views = [cutmix(unlabeled[key], box) for key, box in zip(STRONG_VIEWS, boxes)]
        perturbed = len(weak) if cfg.feature_dropout > 0 else 0
        if perturbed:  # the weak view, perturbed, rides in the same student pass (one call per step under DDP)
            views.append(weak)
        model_kwargs = {"feature_dropout": cfg.feature_dropout, "perturbed": perturbed} if perturbed else {}
        lab, unl = student_forward(student, labeled, torch.cat(views), **model_kwargs)
        streams = unl["logits"].split(len(weak))
        per_view = [self.confident_consistency(s, cutmix(target, box)) for s, box in zip(streams, boxes)]
        terms = {key: sum(view[key] for view in per_view) / len(per_view) for key in per_view[0]}
        unlabeled_loss = terms["cons"] + terms.get("cons_dist", 0.0)
        if perturbed:
            feature = self.confident_consistency(streams[-1], target)
            terms["cons_fp"] = feature["cons"]
            if "cons_dist" in feature:
                terms["cons_fp_dist"] = feature["cons_dist"]
            unlabeled_loss = 0.5 * unlabeled_loss + 0.5 * (feature["cons"] + feature.get("cons_dist", 0.0))
        sup = self.supervised_loss(lab["logits"], labeled)
        return {"total": sup + cfg.w_cons * unlabeled_loss, "sup": sup, **terms}
