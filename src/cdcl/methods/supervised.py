"""Supervised-only baseline: cross-entropy on the labeled batch."""

from __future__ import annotations

from cdcl.methods.base import Method, student_forward, supervised_loss


class Supervised(Method):
    def losses(self, student, teacher, labeled, unlabeled, step):
        out, _ = student_forward(student, labeled, None)
        sup = supervised_loss(out["logits"], labeled["target"])
        return {"total": sup, "sup": sup}
