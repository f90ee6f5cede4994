"""FixMatch-style pseudo-labelling (Sohn et al. 2020): the model's own weak-view prediction, kept where its
confidence exceeds the threshold, supervises its strong-view prediction. No EMA teacher in the loss."""

from __future__ import annotations

from cdcl.methods.base import Method, student_forward, teacher_forward


class FixMatch(Method):
    name = "fixmatch"

    uses_unlabeled = True

    def losses(self, student, teacher, labeled, unlabeled, step):
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        target = teacher_forward(student, unlabeled["weak"])["logits"]
        lab, unl = student_forward(student, labeled, unlabeled["strong"])
        sup = self.supervised_loss(lab["logits"], labeled)
        terms = self.confident_consistency(unl["logits"], target)
        pseudo = terms["cons"] + terms.get("cons_dist", 0.0)
        return {"total": sup + self.cfg.w_cons * pseudo, "sup": sup, **terms}
