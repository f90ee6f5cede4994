"""Mean Teacher (Tarvainen & Valpola 2017): MSE between student (strong view) and EMA-teacher (weak view)
probabilities on every unlabeled pixel (and between their distance maps, for that representation), weighted by
the sigmoid ramp-up."""

from __future__ import annotations

import torch

from cdcl.instances.representations import distance_consistency
from cdcl.methods.base import Method, student_forward, teacher_forward


class MeanTeacher(Method):
    name = "mean_teacher"

    uses_unlabeled = True

    def losses(self, student, teacher, labeled, unlabeled, step):
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        t_logits = teacher_forward(teacher, unlabeled["weak"])["logits"]
        target = self.consistency_logits(t_logits).softmax(dim=1)
        lab, unl = student_forward(student, labeled, unlabeled["strong"])
        sup = self.supervised_loss(lab["logits"], labeled)
        cons = torch.mean((self.consistency_logits(unl["logits"]).softmax(dim=1) - target) ** 2)
        terms = {"sup": sup, "cons": cons}
        if self.representation == "distance" and self.cfg.instance_consistency:
            terms["cons_dist"] = distance_consistency(unl["logits"], t_logits, self.teacher_confident(t_logits))
            cons = cons + terms["cons_dist"]
        weight = self.cfg.w_cons * self.ramp(step)
        return {"total": sup + weight * cons, **terms}
