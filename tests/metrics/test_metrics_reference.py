"""cdcl.metrics against a plain, one-nucleus-at-a-time implementation of the published formulas.

The reference below follows the papers step by step (Kumar et al. 2017 for AJI, Graham et al. 2019 for AJI+,
Kirillov et al. 2019 for PQ) with Python loops over nuclei and full-image masks, and shares no code with the
package. It runs on 400x400 crops (about 240 nuclei each) of real MoNuSeg label maps perturbed in known ways.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import expand_labels

from cdcl import metrics

CROPS = [("TCGA-HE-7130-01Z-00-DX1", (0, 0)), ("TCGA-KB-A93J-01A-01-TS1", (300, 300))]


# ---- reference implementation --------------------------------------------------------------------------------


def ref_table(gt: np.ndarray, pred: np.ndarray) -> tuple[dict, dict, dict]:
    """Areas of each GT and pred nucleus, and (intersection, union) of every overlapping pair, one GT at a time."""
    gt_area = {int(g): int((gt == g).sum()) for g in np.unique(gt) if g > 0}
    pred_area = {int(p): int((pred == p).sum()) for p in np.unique(pred) if p > 0}
    pairs = {}
    for g in gt_area:
        g_mask = gt == g
        for p in np.unique(pred[g_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            pairs[(g, int(p))] = (int((g_mask & p_mask).sum()), int((g_mask | p_mask).sum()))
    return gt_area, pred_area, pairs


def ref_aji(gt_area: dict, pred_area: dict, pairs: dict) -> tuple[int, int]:
    """Kumar et al.: each GT takes the pred of max IoU (first, i.e. smallest id, on ties); unused preds to U."""
    c = u = 0
    used = set()
    for g in sorted(gt_area):
        best, best_iou = None, 0.0
        for p in sorted(pred_area):
            if (g, p) in pairs:
                inter, union = pairs[(g, p)]
                if inter / union > best_iou:
                    best, best_iou = p, inter / union
        if best is None:
            u += gt_area[g]
        else:
            c += pairs[(g, best)][0]
            u += pairs[(g, best)][1]
            used.add(best)
    for p in pred_area:
        if p not in used:
            u += pred_area[p]
    return c, u


def ref_aji_plus(gt_area: dict, pred_area: dict, pairs: dict) -> tuple[int, int]:
    """Graham et al.: Hungarian pairing on the full GT x pred IoU matrix, IoU-0 pairs dropped, unpaired to U."""
    gts, preds = sorted(gt_area), sorted(pred_area)
    iou = np.zeros((len(gts), len(preds)))
    for i, g in enumerate(gts):
        for j, p in enumerate(preds):
            if (g, p) in pairs:
                iou[i, j] = pairs[(g, p)][0] / pairs[(g, p)][1]
    c = u = 0
    paired_g, paired_p = set(), set()
    for i, j in zip(*linear_sum_assignment(-iou)):
        if iou[i, j] > 0:
            inter, union = pairs[(gts[i], preds[j])]
            c += inter
            u += union
            paired_g.add(gts[i])
            paired_p.add(preds[j])
    u += sum(a for g, a in gt_area.items() if g not in paired_g)
    u += sum(a for p, a in pred_area.items() if p not in paired_p)
    return c, u


def ref_pq(gt_area: dict, pred_area: dict, pairs: dict) -> dict:
    """Kirillov et al.: matches are pairs with IoU > 0.5 (unique by construction)."""
    tp, iou_sum = 0, 0.0
    for inter, union in pairs.values():
        if inter / union > 0.5:
            tp += 1
            iou_sum += inter / union
    fp, fn = len(pred_area) - tp, len(gt_area) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": tp, "fp": fp, "fn": fn}


# ---- known perturbations --------------------------------------------------------------------------------------


def eroded(labels: np.ndarray) -> np.ndarray:
    """Every nucleus loses a 2-pixel rim, also where it touches another nucleus."""
    same = ndi.grey_erosion(labels, size=5) == ndi.grey_dilation(labels, size=5)
    return np.where(same, labels, 0)


def dilated(labels: np.ndarray) -> np.ndarray:
    return expand_labels(labels, 3)


def dropped(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels[labels > 0])
    gone = np.random.default_rng(0).choice(ids, size=len(ids) // 4, replace=False)
    return np.where(np.isin(labels, gone), 0, labels)


def merged(labels: np.ndarray) -> np.ndarray:
    """Pairs of neighbours (within 2 pixels) merged under one id, each nucleus in at most one pair."""
    grown = expand_labels(labels, 1)
    a, b = grown[:, :-1].ravel(), grown[:, 1:].ravel()
    out, taken = labels.copy(), set()
    for x, y in sorted({(int(x), int(y)) for x, y in zip(a, b) if x > 0 and y > 0 and x != y}):
        if x not in taken and y not in taken:
            out[labels == y] = x
            taken.update((x, y))
    return out


def split(labels: np.ndarray) -> np.ndarray:
    """Every other nucleus cut in half along the column of its centroid; the right half gets a new id."""
    out, next_id = labels.copy(), int(labels.max()) + 1
    for k, i in enumerate(np.unique(labels[labels > 0])):
        if k % 2:
            continue
        rows, cols = np.nonzero(labels == i)
        right = cols > cols.mean()
        out[rows[right], cols[right]] = next_id
        next_id += 1
    return out


def shifted(labels: np.ndarray) -> np.ndarray:
    out = np.zeros_like(labels)
    out[3:, :-2] = labels[:-3, 2:]
    return out


def relabelled(labels: np.ndarray) -> np.ndarray:
    """Same nuclei under large, shuffled, non-contiguous ids, then shifted."""
    ids = np.unique(labels[labels > 0])
    new = np.random.default_rng(1).permutation(len(ids)) * 13 + 70000
    lut = dict(zip(ids.tolist(), new.tolist()))
    return shifted(np.vectorize(lambda v: lut.get(v, 0))(labels).astype(np.int64))


PERTURBATIONS = [eroded, dilated, dropped, merged, split, shifted, relabelled]


@pytest.fixture(scope="module")
def crops(shared_data):
    out = []
    for stem, (r, c) in CROPS:
        mask = np.array(Image.open(shared_data / "monuseg" / "train" / "masks" / f"{stem}.png")).astype(np.int64)
        out.append(mask[r : r + 400, c : c + 400])
    return out


@pytest.mark.parametrize("perturb", PERTURBATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("crop_index", range(len(CROPS)))
def test_agrees_with_reference(crops, crop_index, perturb):
    gt = crops[crop_index]
    pred = perturb(gt)
    assert pred.shape == gt.shape and len(np.unique(gt)) > 100
    got = metrics.evaluate_pair(gt, pred)
    table = ref_table(gt, pred)

    c, u = ref_aji(*table)
    assert (got["aji_intersection"], got["aji_union"]) == (c, u)
    assert got["aji"] == pytest.approx(c / u, abs=1e-6)
    c, u = ref_aji_plus(*table)
    assert (got["aji_plus_intersection"], got["aji_plus_union"]) == (c, u)
    assert got["aji_plus"] == pytest.approx(c / u, abs=1e-6)
    ref = ref_pq(*table)
    assert (got["tp"], got["fp"], got["fn"]) == (ref["tp"], ref["fp"], ref["fn"])
    assert {k: got[k] for k in ("dq", "sq", "pq")} == pytest.approx({k: ref[k] for k in ("dq", "sq", "pq")}, abs=1e-6)


def test_perturbations_hurt_as_expected(crops):
    """Sanity of the fixtures: each perturbation lowers AJI; merges and splits keep the pixels (Dice 1)."""
    gt = crops[0]
    for perturb in PERTURBATIONS:
        assert metrics.evaluate_pair(gt, perturb(gt))["aji"] < 0.95, perturb.__name__
    for perturb in (merged, split):
        assert metrics.evaluate_pair(gt, perturb(gt))["dice"] == 1.0
    # A merged pred counts for both of its GTs in AJI but for one in AJI+ (the other GT goes unpaired).
    merge = metrics.evaluate_pair(gt, merged(gt))
    assert merge["aji_plus"] < merge["aji"]
