"""Nucleus segmentation metrics with pinned definitions: Dice/IoU, AJI, AJI+, DQ/SQ/PQ and object F1.

numpy/scipy only; imports nothing else from cdcl, so the numbers can be reproduced without the model code.

Conventions shared by every function:

* ``gt`` and ``pred`` are integer label maps of the same shape. A value > 0 is a nucleus id, 0 (and any
  negative value) is background. Ids need not be contiguous or start at 1.
* Every function also returns the raw counts its scores come from, so a dataset can be reported as the mean of
  per-image scores and as one score from counts summed over images (:func:`aggregate`), by the same code.
* A ratio whose denominator is 0 is **1.0 when neither map contains a nucleus** (nothing to find, nothing
  found: perfect agreement) and **0.0 otherwise** (e.g. precision with no predicted nucleus but a GT one).
  So both-empty scores 1 everywhere, exactly one empty scores 0 everywhere, and nothing is ever NaN.
* IoU of a GT/pred pair is ``|G & P| / |G | P|`` in pixels. All matching works on one sparse GT x pred
  overlap table built from the pixels where both maps are foreground, never one full-image pass per nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SCORE_KEYS = ("dice", "iou", "aji", "aji_plus", "dq", "sq", "pq", "precision", "recall", "f1")
COUNT_KEYS = (
    "pixel_intersection", "pixel_gt_area", "pixel_pred_area", "pixel_union",
    "aji_intersection", "aji_union", "aji_plus_intersection", "aji_plus_union",
    "n_gt", "n_pred", "tp", "fp", "fn", "iou_sum",
)  # fmt: skip


@dataclass(frozen=True)
class _Overlap:
    """Areas of every nucleus and the intersection of every overlapping GT/pred pair.

    Instances are indexed 0..n-1 in increasing id order; pairs are sorted by GT index, then pred index.
    """

    gt_areas: np.ndarray
    pred_areas: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def pair_union(self) -> np.ndarray:
        return self.gt_areas[self.pair_gt] + self.pred_areas[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        return self.pair_inter / self.pair_union


def _index_map(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel instance index (-1 for background) and the area of each instance, in increasing id order.

    Ids no larger than the pixel count go through an O(n) bincount lookup table; larger ones through a sort.
    """
    fg = labels > 0
    values = labels[fg]
    if values.size and values.max() <= labels.size:
        counts = np.bincount(values.astype(np.intp, copy=False))
        ids = np.flatnonzero(counts)
        lookup = np.zeros(len(counts), dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        inverse, areas = lookup[values], counts[ids]
    else:
        _, inverse, areas = np.unique(values, return_inverse=True, return_counts=True)
    index = np.full(labels.shape, -1, dtype=np.int64)
    index[fg] = inverse.ravel()
    return index, areas.astype(np.int64)


def _overlap(gt: np.ndarray, pred: np.ndarray) -> _Overlap:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
    for name, arr in (("gt", gt), ("pred", pred)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    gt_index, gt_areas = _index_map(gt.view(np.uint8) if gt.dtype == bool else gt)
    pred_index, pred_areas = _index_map(pred.view(np.uint8) if pred.dtype == bool else pred)
    both = (gt_index >= 0) & (pred_index >= 0)
    n_pred = max(len(pred_areas), 1)
    codes, inter = np.unique(gt_index[both] * n_pred + pred_index[both], return_counts=True)
    return _Overlap(gt_areas, pred_areas, codes // n_pred, codes % n_pred, inter.astype(np.int64))


def _ratio(num: float, den: float, empty: bool) -> float:
    """num/den, with the module's rule for a zero denominator (1.0 if both maps are empty, else 0.0)."""
    if den == 0:
        return 1.0 if empty else 0.0
    return float(num) / float(den)


def _unmatched_area(areas: np.ndarray, matched: np.ndarray) -> int:
    keep = np.ones(len(areas), dtype=bool)
    keep[matched] = False
    return int(areas[keep].sum())


def _matched_counts(ov: _Overlap, pairs: np.ndarray) -> tuple[int, int]:
    """AJI-style (C, U) for the chosen pairs; areas of GT and pred nuclei in no chosen pair go to U.

    Each GT is in at most one pair; a pred may be in several (Kumar's AJI), its area then entering U once per pair.
    """
    inter = int(ov.pair_inter[pairs].sum())
    union = int(ov.pair_union[pairs].sum())
    union += _unmatched_area(ov.gt_areas, ov.pair_gt[pairs]) + _unmatched_area(ov.pred_areas, ov.pair_pred[pairs])
    return inter, union


def _aji_pairs(ov: _Overlap) -> np.ndarray:
    """For each GT that overlaps any pred, the pair with the largest IoU (ties: the smallest pred id)."""
    order = np.lexsort((ov.pair_pred, -ov.pair_iou, ov.pair_gt))
    _, first = np.unique(ov.pair_gt[order], return_index=True)
    return order[first]


def _max_iou_assignment(ov: _Overlap, candidates: np.ndarray) -> np.ndarray:
    """One-to-one pairing among ``candidates`` (pair indices) maximising the summed IoU.

    Zero-IoU pairs add nothing, so the optimum splits over the connected components of the GT/pred overlap
    graph: components with a single pair are matched directly, the others by scipy's linear_sum_assignment
    (the Hungarian pairing HoVer-Net's ``get_fast_aji_plus`` uses). Among equal-sum optima the one scipy returns
    for the component is kept.
    """
    if len(candidates) == 0:
        return candidates
    n_gt = len(ov.gt_areas)
    rows, cols = ov.pair_gt[candidates], n_gt + ov.pair_pred[candidates]
    n_nodes = n_gt + len(ov.pred_areas)
    graph = coo_matrix((np.ones(len(candidates)), (rows, cols)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    pair_component = component[rows]
    sizes = np.bincount(pair_component, minlength=n_nodes)
    chosen = [candidates[sizes[pair_component] == 1]]
    iou = ov.pair_iou
    for comp in np.flatnonzero(sizes > 1):
        members = candidates[pair_component == comp]
        gi, gi_inv = np.unique(ov.pair_gt[members], return_inverse=True)
        pj, pj_inv = np.unique(ov.pair_pred[members], return_inverse=True)
        table = np.zeros((len(gi), len(pj)))
        slot = np.full((len(gi), len(pj)), -1)
        table[gi_inv, pj_inv] = iou[members]
        slot[gi_inv, pj_inv] = members
        r, c = linear_sum_assignment(table, maximize=True)
        picked = slot[r, c]
        chosen.append(picked[picked >= 0])
    return np.sort(np.concatenate(chosen))


def _matches(ov: _Overlap, iou_threshold: float) -> np.ndarray:
    """Pairs counted as true positives: IoU > iou_threshold (strict).

    Above 0.5 such pairs are unique on both sides (two disjoint preds cannot both cover more than half of a GT's
    union), so no assignment is needed; below 0.5 the maximal-IoU one-to-one pairing is taken among them first.
    """
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    candidates = np.flatnonzero(ov.pair_iou > iou_threshold)
    if iou_threshold >= 0.5:
        return candidates
    return _max_iou_assignment(ov, candidates)


def _pixel_counts(ov: _Overlap) -> dict:
    inter = int(ov.pair_inter.sum())
    gt_area, pred_area = int(ov.gt_areas.sum()), int(ov.pred_areas.sum())
    return {"intersection": inter, "gt_area": gt_area, "pred_area": pred_area, "union": gt_area + pred_area - inter}


def _match_counts(ov: _Overlap, iou_threshold: float) -> dict:
    tp_pairs = _matches(ov, iou_threshold)
    tp = len(tp_pairs)
    return {
        "tp": tp,
        "fp": len(ov.pred_areas) - tp,
        "fn": len(ov.gt_areas) - tp,
        "iou_sum": float(ov.pair_iou[tp_pairs].sum()),
    }


def _pixel_scores(intersection: int, gt_area: int, pred_area: int, union: int) -> dict:
    empty = gt_area + pred_area == 0
    return {"dice": _ratio(2 * intersection, gt_area + pred_area, empty), "iou": _ratio(intersection, union, empty)}


def _pq_scores(tp: int, fp: int, fn: int, iou_sum: float) -> dict:
    empty = tp + fp + fn == 0
    dq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty)
    sq = _ratio(iou_sum, tp, empty)
    return {"dq": dq, "sq": sq, "pq": dq * sq}


def _f1_scores(tp: int, fp: int, fn: int) -> dict:
    empty = tp + fp + fn == 0
    return {
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
    }


def pixel_counts(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Pixel counts of the nucleus class (label > 0): ``intersection``, ``gt_area``, ``pred_area``, ``union``."""
    return _pixel_counts(_overlap(gt, pred))


def dice_iou(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Dice ``2|G&P| / (|G|+|P|)`` and IoU ``|G&P| / |G|P|`` of the nucleus class, with the raw pixel counts.

    G and P are the foreground (label > 0) pixel sets; instance ids play no part.
    """
    counts = pixel_counts(gt, pred)
    return {**_pixel_scores(**counts), **counts}


def aji(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Aggregated Jaccard Index of Kumar et al. (IEEE TMI 2017): ``{"aji", "intersection", "union"}``.

    Each GT nucleus G_i is paired with the pred nucleus S_j of largest IoU with it (ties: the smallest pred id);
    C += |G_i & S_j|, U += |G_i | S_j|. A pred may be paired with several GTs (its area then counts once per
    pairing; AJI+ forbids this). A GT overlapping no pred adds |G_i| to U; every pred paired
    with no GT adds its area to U. AJI = C / U.
    """
    ov = _overlap(gt, pred)
    inter, union = _matched_counts(ov, _aji_pairs(ov))
    return {"aji": _ratio(inter, union, union == 0), "intersection": inter, "union": union}


def aji_plus(gt: np.ndarray, pred: np.ndarray) -> dict:
    """AJI+ of Graham et al. (HoVer-Net, Medical Image Analysis 2019): ``{"aji_plus", "intersection", "union"}``.

    GT and pred nuclei are paired one-to-one by the assignment maximising the summed IoU (Hungarian algorithm,
    as HoVer-Net's ``get_fast_aji_plus``); pairs with IoU 0 are dropped. C and U sum |G & S| and |G | S| over
    the pairs, then the areas of all unpaired GT and unpaired pred nuclei are added to U. AJI+ = C / U.
    """
    ov = _overlap(gt, pred)
    inter, union = _matched_counts(ov, _max_iou_assignment(ov, np.arange(len(ov.pair_inter))))
    return {"aji_plus": _ratio(inter, union, union == 0), "intersection": inter, "union": union}


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Panoptic quality (Kirillov et al. 2019) for one class: ``{"dq", "sq", "pq", "tp", "fp", "fn", "iou_sum"}``.

    A GT/pred pair is a true positive when IoU > ``iou_threshold`` (strictly: IoU exactly 0.5 does not match).
    FP = preds not matched, FN = GTs not matched. DQ = TP / (TP + FP/2 + FN/2), SQ = (sum of matched IoUs) / TP,
    PQ = DQ * SQ. SQ is 0 when there is no TP (unless both maps are empty: then all are 1).
    """
    counts = _match_counts(_overlap(gt, pred), iou_threshold)
    return {**_pq_scores(**counts), **counts}


def object_f1(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Object detection precision TP/(TP+FP), recall TP/(TP+FN) and F1 2TP/(2TP+FP+FN).

    Matching as :func:`panoptic_quality` (IoU > ``iou_threshold``), so F1 equals DQ.
    """
    counts = _match_counts(_overlap(gt, pred), iou_threshold)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {**_f1_scores(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}


def _counts(ov: _Overlap) -> dict:
    """Every raw count of :data:`COUNT_KEYS` for one image, from one overlap table."""
    pixels = _pixel_counts(ov)
    aji_inter, aji_union = _matched_counts(ov, _aji_pairs(ov))
    plus_inter, plus_union = _matched_counts(ov, _max_iou_assignment(ov, np.arange(len(ov.pair_inter))))
    return {
        **{f"pixel_{key}": value for key, value in pixels.items()},
        "aji_intersection": aji_inter,
        "aji_union": aji_union,
        "aji_plus_intersection": plus_inter,
        "aji_plus_union": plus_union,
        "n_gt": len(ov.gt_areas),
        "n_pred": len(ov.pred_areas),
        **_match_counts(ov, 0.5),
    }


def scores_from_counts(counts: dict) -> dict:
    """All scores of :data:`SCORE_KEYS` from the raw counts of one image or of counts summed over images."""
    c = counts
    return {
        **_pixel_scores(c["pixel_intersection"], c["pixel_gt_area"], c["pixel_pred_area"], c["pixel_union"]),
        "aji": _ratio(c["aji_intersection"], c["aji_union"], c["aji_union"] == 0),
        "aji_plus": _ratio(c["aji_plus_intersection"], c["aji_plus_union"], c["aji_plus_union"] == 0),
        **_pq_scores(c["tp"], c["fp"], c["fn"], c["iou_sum"]),
        **_f1_scores(c["tp"], c["fp"], c["fn"]),
    }


def evaluate_pair(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Every score (SCORE_KEYS, floats) and raw count (COUNT_KEYS, ints; ``iou_sum`` float) for one image.

    The overlap table is built once. PQ and F1 use IoU > 0.5. Counts are named ``pixel_*`` (foreground
    pixels), ``aji_*`` / ``aji_plus_*`` (C and U of each index), ``n_gt`` / ``n_pred`` (nuclei) and
    ``tp`` / ``fp`` / ``fn`` / ``iou_sum`` (the PQ matching).
    """
    counts = _counts(_overlap(gt, pred))
    return {**scores_from_counts(counts), **counts}


def aggregate(per_image: list[dict]) -> dict:
    """Dataset scores two ways: ``mean`` of per-image scores and ``pooled`` scores from summed raw counts.

    ``per_image`` holds :func:`evaluate_pair` results. Returns ``{"mean": {score: value}, "pooled": {score:
    value}, "totals": {count: summed value}, "n_images": n}``. Pooled AJI is sum(C) / sum(U) over images; pooled
    PQ uses the summed TP, FP, FN and IoU sums. Mean and pooled differ whenever images differ in size or
    nucleus count, which is why both are reported.
    """
    if not per_image:
        raise ValueError("no images to aggregate")
    mean = {key: float(np.mean([row[key] for row in per_image])) for key in SCORE_KEYS}
    totals = {key: sum(row[key] for row in per_image) for key in COUNT_KEYS}
    return {"mean": mean, "pooled": scores_from_counts(totals), "totals": totals, "n_images": len(per_image)}
