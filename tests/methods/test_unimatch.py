"""UniMatch: each loss term on a tiny batch, the switches, the feature perturbation of the model, CutMix, and the
second strong view of the loader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cdcl.config import MethodConfig, load_config
from cdcl.data.views import AugmentConfig, paired_views
from cdcl.instances.representations import REPRESENTATIONS, make_targets
from cdcl.methods import build_method
from cdcl.methods.cutmix import AREA, cutmix, cutmix_boxes
from cdcl.models import build_model

TINY = ["model.decoder_channels=[16,16,16]", "model.feature_channels=16", "model.head_channels=8"]


def batches(representation: str, background: bool = False) -> tuple[dict, dict]:
    """Two labeled 64 px images (two square nuclei, or none) and two unlabeled images with two strong views."""
    g = torch.Generator().manual_seed(0)
    instances = np.zeros((64, 64), np.int32)
    if not background:
        instances[10:26, 12:28], instances[36:50, 30:48] = 1, 2
    targets = {k: torch.from_numpy(np.stack([v, v])) for k, v in make_targets(instances, representation).items()}
    weak = torch.rand(2, 3, 64, 64, generator=g)
    unlabeled = {"weak": weak, "strong": (weak * 0.8).clamp(0, 1), "strong2": (weak + 0.1).clamp(0, 1)}
    return {"image": torch.rand(2, 3, 64, 64, generator=g), **targets}, unlabeled


def terms_of(representation: str = "binary", background: bool = False, **settings) -> dict[str, torch.Tensor]:
    config = load_config(None, [*TINY, f"model.instances={representation}"])
    torch.manual_seed(0)
    student = build_model(config.model)
    settings = {"name": "unimatch", "warmup_iters": 0, "threshold": 0.0, "cutmix_prob": 1.0, **settings}
    method = build_method(dataclasses.replace(config.method, **settings), representation)
    labeled, unlabeled = batches(representation, background)
    torch.manual_seed(1)
    return method.losses(student, None, labeled, unlabeled, step=5)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_every_term_is_finite_and_the_total_weighs_them_as_unimatch(representation):
    terms = terms_of(representation)
    expected = {"sup", "cons", "cons_fp"} | ({"cons_dist", "cons_fp_dist"} if representation == "distance" else set())
    assert expected <= set(terms), terms
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert all(float(terms[k].detach()) > 0 for k in expected), terms
    image = terms["cons"] + terms.get("cons_dist", 0.0)
    feature = terms["cons_fp"] + terms.get("cons_fp_dist", 0.0)
    assert torch.allclose(terms["total"], terms["sup"] + 0.5 * image + 0.5 * feature)
    terms["total"].backward()


@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_an_all_background_batch_gives_finite_terms(representation):
    terms = terms_of(representation, background=True, threshold=0.9)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    terms["total"].backward()


def test_switched_off_terms_are_absent_or_zero():
    no_feature = terms_of(feature_dropout=0.0)
    assert "cons_fp" not in no_feature
    assert torch.equal(no_feature["total"], no_feature["sup"] + no_feature["cons"])
    no_unlabeled = terms_of(w_cons=0.0)
    assert torch.equal(no_unlabeled["total"], no_unlabeled["sup"] + 0.0 * no_unlabeled["cons"])
    warm_up = terms_of(warmup_iters=10)
    assert set(warm_up) == {"total", "sup"}


def test_unmixed_single_view_without_feature_stream_is_fixmatch_exactly():
    for representation in ("binary", "distance"):
        plain = {"strong_views": 1, "cutmix_prob": 0.0, "feature_dropout": 0.0}
        unimatch = terms_of(representation, **plain)
        fixmatch = terms_of(representation, name="fixmatch")
        assert unimatch.keys() == fixmatch.keys()
        assert all(torch.equal(unimatch[k], fixmatch[k]) for k in unimatch), (unimatch, fixmatch)


def test_second_view_and_cutmix_each_change_the_image_term():
    base = terms_of(strong_views=1, cutmix_prob=0.0)
    assert not torch.equal(terms_of(strong_views=2, cutmix_prob=0.0)["cons"], base["cons"])
    assert not torch.equal(terms_of(strong_views=1, cutmix_prob=1.0)["cons"], base["cons"])


def test_feature_dropout_perturbs_only_the_last_images():
    config = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(config.model).eval()  # running BN statistics: images do not see each other
    x = torch.rand(3, 3, 64, 64)
    plain = model(x)["logits"]
    assert torch.equal(model(x, feature_dropout=0.5, perturbed=0)["logits"], plain)
    assert torch.equal(model(x, feature_dropout=0.0, perturbed=2)["logits"], plain)
    perturbed = model(x, feature_dropout=0.5, perturbed=2)["logits"]
    assert torch.equal(perturbed[:1], plain[:1])
    assert not torch.equal(perturbed[1:], plain[1:])


def test_cutmix_boxes_follow_the_probability_and_area_range():
    g = torch.Generator().manual_seed(0)
    assert not cutmix_boxes(4, (64, 48), 0.0, g).any()
    boxes = cutmix_boxes(200, (64, 48), 1.0, g)
    area = boxes.float().mean(dim=(1, 2))
    assert area.min() > 0.5 * AREA[0] and area.max() < 1.5 * AREA[1]
    rows, cols = boxes.any(dim=2), boxes.any(dim=1)  # each box is one rectangle
    assert torch.equal(boxes.sum(dim=(1, 2)), rows.sum(dim=1) * cols.sum(dim=1))
    again = cutmix_boxes(200, (64, 48), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(cutmix_boxes(200, (64, 48), 1.0, torch.Generator().manual_seed(0)), again)
    assert 60 < int(cutmix_boxes(200, (8, 8), 0.5, g).flatten(1).any(dim=1).sum()) < 140


def test_cutmix_pastes_the_next_image_inside_the_box():
    x = torch.arange(3.0)[:, None, None, None].expand(3, 2, 4, 4)
    boxes = torch.zeros(3, 4, 4, dtype=torch.bool)
    boxes[0, 1:3, 1:3] = True
    mixed = cutmix(x, boxes)
    assert torch.equal(mixed[0, :, 1:3, 1:3], torch.full((2, 2, 2), 2.0))  # from the last image (roll by one)
    assert mixed[0].sum() == 2 * 4 * 2.0  # 2 channels x 4 box pixels of 2.0, zeros elsewhere
    assert torch.equal(mixed[1:], x[1:])


def test_the_second_strong_view_leaves_the_first_views_unchanged():
    image = (np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)
    cfg = AugmentConfig(crop_size=64)
    one = paired_views(image, np.random.default_rng(3), cfg)
    weak, strong, strong2 = paired_views(image, np.random.default_rng(3), cfg, strong_views=2)
    assert np.array_equal(one[0], weak) and np.array_equal(one[1], strong) and not np.array_equal(strong, strong2)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("strong_views", 3, "method.strong_views must be in [1, 2]"),
        ("feature_dropout", 1.0, "method.feature_dropout must be in [0, 1)"),
        ("cutmix_prob", -0.1, "method.cutmix_prob in [0, 1]"),
    ],
)
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace(")", r"\)")):
        MethodConfig(name="unimatch", **{key: value})
