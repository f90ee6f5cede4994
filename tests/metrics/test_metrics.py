"""Golden tests: tiny hand-made label maps whose every metric value is worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from cdcl import metrics

# --- a mixed case (6x6) ---------------------------------------------------------------------------------------
# GT: 1 (area 6), 2 (area 4), 3 (area 1, missed).  Pred: 5 (area 4, inside GT 1), 8 (area 6, covers GT 2),
# 9 (area 2, overlaps nothing).
MIXED_GT = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 2, 2],
        [0, 0, 0, 0, 2, 2],
        [3, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
MIXED_PRED = np.array(
    [
        [5, 5, 0, 0, 0, 0],
        [5, 5, 0, 0, 0, 0],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 0, 0, 8, 8],
        [0, 0, 9, 9, 0, 0],
    ]
)
# Pixels: I = 4 + 4 = 8, |G| = 11, |P| = 12, U = 15 -> dice 16/23, iou 8/15.
# IoU(1,5) = 4/6, IoU(2,8) = 4/6; GT 3 and pred 9 overlap nothing.
# AJI: C = 4 + 4 = 8; U = 6 + 6 + |GT3| 1 + unused pred 9 (2) = 15 -> 8/15. AJI+ pairs the same -> 8/15.
# PQ: TP 2 (IoU 2/3 each), FP 1 (pred 9), FN 1 (GT 3): DQ = 2 / (2 + 0.5 + 0.5) = 2/3, SQ = (4/3) / 2 = 2/3,
# PQ = 4/9; precision = recall = F1 = 2/3.

# --- a merge (4x6): two GT nuclei of area 4 covered by one pred of area 10 -------------------------------------
MERGE_GT = np.array(
    [
        [1, 1, 0, 2, 2, 0],
        [1, 1, 0, 2, 2, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
MERGE_PRED = np.array(
    [
        [7, 7, 7, 7, 7, 0],
        [7, 7, 7, 7, 7, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
# Pixels: I = 8, |G| = 8, |P| = 10, U = 10 -> dice 16/18, iou 0.8. IoU(1,7) = IoU(2,7) = 4/10.
# AJI: both GTs pick pred 7: C = 4 + 4 = 8, U = 10 + 10 = 20 -> 0.4 (the pred's area counted twice).
# AJI+: pred 7 pairs with one GT only: C = 4, U = 10 + unpaired GT (4) = 14 -> 2/7.
# PQ: no IoU > 0.5: TP 0, FP 1, FN 2 -> DQ = SQ = PQ = 0; precision = recall = F1 = 0.

# --- a split (4x6): one GT nucleus of area 8 cut into two preds of area 4, IoU exactly 0.5 each ----------------
SPLIT_GT = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 3, 3, 3, 3, 0],
        [0, 3, 3, 3, 3, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
SPLIT_PRED = np.array(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 9, 9, 4, 4, 0],
        [0, 9, 9, 4, 4, 0],
        [0, 0, 0, 0, 0, 0],
    ]
)
# AJI: tie IoU 0.5 / 0.5 -> smallest pred id (4): C = 4, U = 8 + unused pred 9 (4) = 12 -> 1/3. AJI+ likewise.
# PQ at IoU > 0.5: IoU exactly 0.5 is NOT a match: TP 0, FP 2, FN 1 -> all 0.
# PQ at IoU > 0.4: one pair matches: TP 1, FP 1, FN 0 -> DQ = 1 / 1.5 = 2/3, SQ = 0.5, PQ = 1/3.

# --- greedy vs one-to-one pairing (1x20) ------------------------------------------------------------------------
# GT A = 1 on columns 0-9, GT B = 2 on 10-19. Pred Y = 1 on 0-3, pred X = 2 on 4-13.
PAIRING_GT = np.array([[1] * 10 + [2] * 10])
PAIRING_PRED = np.array([[1] * 4 + [2] * 10 + [0] * 6])
# IoU(A,Y) = 4/10 = 0.4, IoU(A,X) = 6/14 = 0.4286, IoU(B,X) = 4/16 = 0.25.
# AJI: A -> X (0.4286 > 0.4), B -> X: C = 6 + 4 = 10, U = 14 + 16 + unused Y (4) = 34 -> 5/17.
# AJI+: {A-Y, B-X} sums 0.65 > {A-X} 0.4286: C = 4 + 4 = 8, U = 10 + 16 = 26 -> 4/13.
# (A greedy one-to-one pairing would take A-X and give 6/28.)


def test_mixed_case_every_metric():
    got = metrics.evaluate_pair(MIXED_GT, MIXED_PRED)
    expected = {
        "dice": 16 / 23, "iou": 8 / 15, "aji": 8 / 15, "aji_plus": 8 / 15,
        "dq": 2 / 3, "sq": 2 / 3, "pq": 4 / 9, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
    }  # fmt: skip
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    counts = {
        "pixel_intersection": 8, "pixel_gt_area": 11, "pixel_pred_area": 12, "pixel_union": 15,
        "aji_intersection": 8, "aji_union": 15, "aji_plus_intersection": 8, "aji_plus_union": 15,
        "n_gt": 3, "n_pred": 3, "tp": 2, "fp": 1, "fn": 1,
    }  # fmt: skip
    assert {k: got[k] for k in counts} == counts
    assert got["iou_sum"] == pytest.approx(4 / 3)
    assert set(got) == set(metrics.SCORE_KEYS) | set(metrics.COUNT_KEYS)


def test_individual_functions_match_hand_values():
    pixels = metrics.pixel_counts(MIXED_GT, MIXED_PRED)
    assert pixels == {"intersection": 8, "gt_area": 11, "pred_area": 12, "union": 15}
    d = metrics.dice_iou(MIXED_GT, MIXED_PRED)
    assert d["dice"] == pytest.approx(16 / 23) and d["iou"] == pytest.approx(8 / 15) and d["union"] == 15
    assert metrics.aji(MIXED_GT, MIXED_PRED) == {"aji": pytest.approx(8 / 15), "intersection": 8, "union": 15}
    assert metrics.aji_plus(MIXED_GT, MIXED_PRED) == {"aji_plus": pytest.approx(8 / 15), "intersection": 8, "union": 15}
    pq = metrics.panoptic_quality(MIXED_GT, MIXED_PRED)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (2, 1, 1)
    assert (pq["dq"], pq["sq"], pq["pq"], pq["iou_sum"]) == pytest.approx((2 / 3, 2 / 3, 4 / 9, 4 / 3))
    f1 = metrics.object_f1(MIXED_GT, MIXED_PRED)
    assert f1 == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                  "tp": 2, "fp": 1, "fn": 1}  # fmt: skip


def test_merge_counts_for_both_gts_in_aji_for_one_in_aji_plus():
    got = metrics.evaluate_pair(MERGE_GT, MERGE_PRED)
    assert got["dice"] == pytest.approx(16 / 18) and got["iou"] == pytest.approx(0.8)
    assert (got["aji_intersection"], got["aji_union"]) == (8, 20) and got["aji"] == pytest.approx(0.4)
    assert (got["aji_plus_intersection"], got["aji_plus_union"]) == (4, 14)
    assert got["aji_plus"] == pytest.approx(2 / 7)
    assert (got["tp"], got["fp"], got["fn"]) == (0, 1, 2)
    assert [got[k] for k in ("dq", "sq", "pq", "precision", "recall", "f1")] == [0.0] * 6


def test_split_and_iou_exactly_half_is_not_a_match():
    got = metrics.evaluate_pair(SPLIT_GT, SPLIT_PRED)
    assert (got["aji_intersection"], got["aji_union"]) == (4, 12) and got["aji"] == pytest.approx(1 / 3)
    assert got["aji_plus"] == pytest.approx(1 / 3)
    assert (got["tp"], got["fp"], got["fn"]) == (0, 2, 1) and got["pq"] == 0.0
    looser = metrics.panoptic_quality(SPLIT_GT, SPLIT_PRED, iou_threshold=0.4)
    assert (looser["tp"], looser["fp"], looser["fn"]) == (1, 1, 0)
    assert (looser["dq"], looser["sq"], looser["pq"]) == pytest.approx((2 / 3, 0.5, 1 / 3))


def test_aji_plus_uses_the_maximal_one_to_one_pairing():
    assert metrics.aji(PAIRING_GT, PAIRING_PRED) == {"aji": pytest.approx(5 / 17), "intersection": 10, "union": 34}
    got = metrics.aji_plus(PAIRING_GT, PAIRING_PRED)
    assert got == {"aji_plus": pytest.approx(4 / 13), "intersection": 8, "union": 26}


def test_low_threshold_matching_is_one_to_one():
    # At IoU > 0.2, A-Y, A-X and B-X all qualify; the maximal one-to-one pairing {A-Y, B-X} gives TP 2,
    # SQ = (0.4 + 0.25) / 2 = 0.325, DQ = 1.
    pq = metrics.panoptic_quality(PAIRING_GT, PAIRING_PRED, iou_threshold=0.2)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (2, 0, 0)
    assert (pq["dq"], pq["sq"]) == pytest.approx((1.0, 0.325))


def test_perfect_match_with_non_contiguous_ids_is_exactly_one():
    gt = MIXED_GT * 37 + 1000 * (MIXED_GT > 0)  # ids 1037, 1074, 1111
    pred = np.select([MIXED_GT == 1, MIXED_GT == 2, MIXED_GT == 3], [5, 2, 90000], 0).astype(np.int64)
    got = metrics.evaluate_pair(gt.astype(np.uint16), pred)
    assert all(got[k] == 1.0 for k in metrics.SCORE_KEYS)
    assert (got["tp"], got["fp"], got["fn"], got["n_gt"]) == (3, 0, 0, 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint64])
def test_ids_and_dtypes_do_not_change_values(dtype):
    relabelled = np.where(MIXED_PRED > 0, MIXED_PRED * 20 + 3, 0).astype(dtype)  # ids 103, 163, 183
    assert metrics.evaluate_pair(MIXED_GT.astype(dtype), relabelled) == metrics.evaluate_pair(MIXED_GT, MIXED_PRED)


def test_empty_prediction_scores_zero():
    got = metrics.evaluate_pair(MIXED_GT, np.zeros_like(MIXED_GT))
    assert all(got[k] == 0.0 for k in metrics.SCORE_KEYS)
    assert (got["tp"], got["fp"], got["fn"], got["aji_union"], got["pixel_union"]) == (0, 0, 3, 11, 11)


def test_empty_ground_truth_scores_zero():
    got = metrics.evaluate_pair(np.zeros_like(MIXED_PRED), MIXED_PRED)
    assert all(got[k] == 0.0 for k in metrics.SCORE_KEYS)
    assert (got["tp"], got["fp"], got["fn"], got["aji_plus_union"]) == (0, 3, 0, 12)


def test_both_empty_scores_one():
    empty = np.zeros((5, 7), dtype=np.int32)
    got = metrics.evaluate_pair(empty, empty)
    assert all(got[k] == 1.0 for k in metrics.SCORE_KEYS)
    assert all(got[k] == 0 for k in metrics.COUNT_KEYS)


def test_bool_and_negative_values():
    # A bool map is one nucleus; negative values count as background.
    gt = np.where(MERGE_GT > 0, MERGE_GT, -1)
    got = metrics.evaluate_pair(gt, MERGE_PRED > 0)
    assert (got["n_gt"], got["n_pred"], got["aji_union"]) == (2, 1, 20)


def test_aggregate_mean_and_pooled():
    rows = [metrics.evaluate_pair(MIXED_GT, MIXED_PRED), metrics.evaluate_pair(MERGE_GT, MERGE_PRED)]
    agg = metrics.aggregate(rows)
    assert agg["n_images"] == 2
    assert agg["mean"]["aji"] == pytest.approx((8 / 15 + 0.4) / 2)
    assert agg["pooled"]["aji"] == pytest.approx((8 + 8) / (15 + 20))
    # Pooled PQ: TP 2, FP 2, FN 3, IoU sum 4/3 -> DQ = 2 / 4.5, SQ = 2/3.
    assert agg["pooled"]["dq"] == pytest.approx(2 / 4.5) and agg["pooled"]["sq"] == pytest.approx(2 / 3)
    assert agg["pooled"]["dice"] == pytest.approx(2 * 16 / (19 + 22))
    assert agg["totals"]["tp"] == 2 and agg["totals"]["pixel_union"] == 25
    assert set(agg["mean"]) == set(agg["pooled"]) == set(metrics.SCORE_KEYS)


def test_empty_images_add_nothing_to_pooled_scores():
    empty = np.zeros_like(MIXED_GT)
    alone = metrics.aggregate([metrics.evaluate_pair(MIXED_GT, MIXED_PRED)])
    with_empty = metrics.aggregate([metrics.evaluate_pair(MIXED_GT, MIXED_PRED), metrics.evaluate_pair(empty, empty)])
    assert with_empty["pooled"] == alone["pooled"]
    assert with_empty["mean"]["aji"] == pytest.approx((8 / 15 + 1.0) / 2)


@pytest.mark.parametrize(
    ("gt", "pred", "message"),
    [
        (np.zeros((3, 3), int), np.zeros((3, 4), int), "shapes differ"),
        (np.zeros((3, 3)), np.zeros((3, 3), int), "integer label map"),
    ],
)
def test_bad_input_raises(gt, pred, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_pair(gt, pred)


def test_bad_threshold_raises():
    with pytest.raises(ValueError, match="iou_threshold"):
        metrics.panoptic_quality(MIXED_GT, MIXED_PRED, iou_threshold=1.0)


def test_aggregate_needs_images():
    with pytest.raises(ValueError, match="no images"):
        metrics.aggregate([])
