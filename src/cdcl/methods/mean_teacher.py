"""Mean Teacher (Tarvainen & Valpola 2017): MSE between student (strong view) and EMA-teacher (weak view)
probabilities on every unlabeled pixel, weighted by the sigmoid ramp-up."""

from __future__ import annotations

import torch

from cdcl.methods.base import Method, student_forward, supervised_loss, teacher_forward


class MeanTeacher(Method):
    uses_unlabeled = True

    def losses(self, student, teacher, labeled, unlabeled, step):
        if not self.unlabeled_active(step):
            return self.supervised_only(student, labeled)
        target = teacher_forward(teacher, unlabeled["weak"])["logits"].softmax(dim=1)
        lab, unl = student_forward(student, labeled, unlabeled["strong"])
        sup = supervised_loss(lab["logits"], labeled["target"])
        cons = torch.mean((unl["logits"].float().softmax(dim=1) - target) ** 2)
        weight = self.cfg.w_cons * self.ramp(step)
        return {"total": sup + weight * cons, "sup": sup, "cons": cons}
