"""A deliberately naive reference of the cross-patch contrastive loss, written straight from PAPER.md.

Python loops over anchors and bank entries, float64 arithmetic with ``math``; no vectorisation, no stability
tricks, so it is easy to check by eye. Tests and benchmarks compare ``cdcl.methods.losses.patch_contrastive_loss``
to it.
"""

from __future__ import annotations

import math

FC_TOLERANCE = 1e-6  # the documented slack of the FC rule (cdcl.methods.losses.FC_TOLERANCE)


def naive_patch_contrastive_loss(
    anchors,
    positives,
    bank,
    anchor_labels,
    bank_labels,
    anchor_fc,
    bank_fc,
    *,
    temperature: float,
    bdp: float,
    fdp: float,
) -> list[float]:
    """Per-anchor ``-log(e^{z.z+/t} / (e^{z.z+/t} + sum_neg e^{z.z-/t}))``; inputs are tensors or nested lists.

    A bank entry j is a negative of anchor i when its label differs and ``fc_i + fc_j <= bdp + fdp``.
    """
    anchors, positives, bank = _rows(anchors), _rows(positives), _rows(bank)
    anchor_labels, bank_labels = _values(anchor_labels), _values(bank_labels)
    anchor_fc, bank_fc = _values(anchor_fc), _values(bank_fc)
    losses = []
    for i, anchor in enumerate(anchors):
        positive = math.exp(_dot(anchor, positives[i]) / temperature)
        denominator = positive
        for j, entry in enumerate(bank):
            if bank_labels[j] != anchor_labels[i] and anchor_fc[i] + bank_fc[j] <= bdp + fdp + FC_TOLERANCE:
                denominator += math.exp(_dot(anchor, entry) / temperature)
        losses.append(-math.log(positive / denominator))
    return losses


def _dot(a: list[float], b: list[float]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def _rows(matrix) -> list[list[float]]:
    return [[float(x) for x in row] for row in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]


def _values(vector) -> list:
    return list(vector.tolist() if hasattr(vector, "tolist") else vector)
