"""FixMatch-style pseudo-labelling (Sohn et al. 2020): the model's own weak-view prediction, kept where its
confidence exceeds the threshold, supervises its strong-view prediction. No EMA teacher in the loss."""

from __future__ import annotations

from cdcl.losses import confident_cross_entropy
from cdcl.methods.base import Method, student_forward, supervised_loss, teacher_forward


class FixMatch(Method):
    uses_unlabeled = True

    def losses(self, student, teacher, labeled, unlabeled, step):
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        target = teacher_forward(student, unlabeled["weak"])["logits"].softmax(dim=1)
        lab, unl = student_forward(student, labeled, unlabeled["strong"])
        sup = supervised_loss(lab["logits"], labeled["target"])
        pseudo, confident = confident_cross_entropy(unl["logits"].float(), target, self.cfg.threshold)
        return {"total": sup + self.cfg.w_cons * pseudo, "sup": sup, "cons": pseudo, "stat/confident": confident}
