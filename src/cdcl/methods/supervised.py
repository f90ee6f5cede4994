"""Supervised-only baseline: cross-entropy on the labeled batch."""

from __future__ import annotations

from cdcl.methods.base import Method


class Supervised(Method):
    name = "supervised"

    def losses(self, student, teacher, labeled, unlabeled, step):
        return self.supervised_only(student, labeled)
