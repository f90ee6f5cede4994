"""The instance model: targets of each representation, their post-processing, the full-resolution head, the
new loss terms, lean checkpoints and old checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdcl.checkpoint import lean_payload, load_checkpoint, save_checkpoint
from cdcl.config import load_config
from cdcl.errors import CdclError
from cdcl.inference.predictor import load_predictor
from cdcl.inference.window import sliding_window_probability
from cdcl.instances.postprocess import PostprocessParams, instances_from_maps, tune_params
from cdcl.instances.representations import REPRESENTATIONS, make_targets, prediction_maps, supervised_loss
from cdcl.methods import build_method
from cdcl.metrics import evaluate_pair
from cdcl.models import build_model
from cdcl.models.unet import SegmentationModel

TINY = [
    "model.decoder_channels=[16,16,16]",
    "model.feature_channels=16",
    "model.head_channels=8",
    "model.embed_dim=8",
    "model.fine_channels=8",
]


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def hand_made() -> dict[str, np.ndarray]:
    """Instance maps a representation must survive: touching discs, a ring, an elongated nucleus, nothing."""
    shape = (96, 96)
    touching = np.zeros(shape, np.int32)
    touching[disc(shape, (48, 36), 12)] = 1
    touching[disc(shape, (48, 59), 12) & (touching == 0)] = 2
    ring = (disc(shape, (48, 48), 20) & ~disc(shape, (48, 48), 12)).astype(np.int32)
    yy, xx = np.mgrid[:96, :96]
    elongated = (((yy - 48) / 5.0) ** 2 + ((xx - 48) / 30.0) ** 2 <= 1).astype(np.int32)
    return {"touching": touching, "ring": ring, "elongated": elongated, "empty": np.zeros(shape, np.int32)}


def ideal_maps(targets: dict[str, np.ndarray], representation: str) -> np.ndarray:
    """The prediction maps a perfect network would give for these targets."""
    classes = targets["target"]
    strength = (classes == 1).astype(np.float32) if representation == "three_class" else targets["distance"]
    return np.stack([(classes > 0).astype(np.float32), strength])


def test_three_class_targets_mark_an_inner_ring_and_touching_borders():
    truth = hand_made()
    classes = make_targets(truth["touching"], "three_class")["target"]
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.array_equal(classes > 0, truth["touching"] > 0)  # the ring lies inside the nuclei
    seam = (truth["touching"][:, :-1] == 1) & (truth["touching"][:, 1:] == 2)  # pixels where the discs touch
    assert seam.any() and np.all(classes[:, :-1][seam] == 2) and np.all(classes[:, 1:][seam] == 2)
    interiors = (classes == 1) & (truth["touching"] == 1), (classes == 1) & (truth["touching"] == 2)
    assert all(part.any() for part in interiors)
    assert make_targets(truth["empty"], "three_class")["target"].max() == 0


def test_distance_targets_are_one_at_each_centre_and_zero_outside():
    truth = hand_made()
    for name, instances in truth.items():
        targets = make_targets(instances, "distance")
        distance = targets["distance"]
        assert distance.dtype == np.float32 and distance.min() >= 0 and distance.max() <= 1
        assert np.all(distance[instances == 0] == 0)
        for label in np.unique(instances)[1:]:
            assert distance[instances == label].max() == pytest.approx(1.0)
        assert np.array_equal(targets["target"], (instances > 0).astype(np.int64)), name


@pytest.mark.parametrize("representation", ["three_class", "distance"])
def test_post_processing_recovers_hand_made_instances_exactly(representation):
    params = PostprocessParams(min_size=0, fill_holes=False)  # the ring's hole is real background
    for name, instances in hand_made().items():
        labels = instances_from_maps(ideal_maps(make_targets(instances, representation), representation), params)
        if not instances.any():
            assert labels.max() == 0
            continue
        scores = evaluate_pair(instances, labels)
        assert scores["aji"] == 1.0 and scores["pq"] == 1.0, (name, scores)


def test_tuning_the_marker_path_finds_working_thresholds():
    truth = hand_made()["touching"]
    maps = ideal_maps(make_targets(truth, "distance"), "distance")
    noisy = np.clip(maps + np.random.default_rng(0).normal(0, 0.05, maps.shape).astype(np.float32), 0, 1)
    params, score = tune_params([noisy], [truth])
    assert score > 0.9 and params.marker_threshold in (0.3, 0.4, 0.5, 0.6, 0.7)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_every_output_stride_and_representation_gives_input_sized_logits(stride, representation):
    config = load_config(None, [*TINY, f"model.output_stride={stride}", f"model.instances={representation}"])
    model = build_model(config.model).eval()
    out = model(torch.rand(2, 3, 64, 96), embeddings=True)
    channels = {"binary": 2, "three_class": 3, "distance": 3}[representation]
    assert out["logits"].shape == (2, channels, 64, 96)
    assert out["embeddings"].shape == (2, 8, 16, 24)  # the projector stays at 1/4
    assert ("logits_lowres" in out) == (stride == 4)
    maps = prediction_maps(out["logits"].detach(), representation)
    assert maps.shape == ((2, 64, 96) if representation == "binary" else (2, 2, 64, 96))
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_full_resolution_head_can_draw_a_one_pixel_gap():
    """At output stride 1 neighbouring input pixels get their own logits (sub-pixel convolution)."""
    model = SegmentationModel(
        encoder="resnet18",
        decoder_channels=(16, 16, 16),
        feature_channels=16,
        head_channels=8,
        embed_dim=8,
        output_stride=1,
        representation="three_class",
        fine_channels=8,
    ).eval()
    logits = model(torch.rand(1, 3, 64, 64))["logits"]
    blocks = logits.reshape(1, 3, 32, 2, 32, 2)
    assert not torch.allclose(blocks[..., 0, :, 0], blocks[..., 1, :, 1])  # not a nearest/bilinear copy


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.output_stride", "3", "model.output_stride must be one of 1, 2, 4, got 3"),
        ("model.instances", "hover", "model.instances must be one of binary, three_class, distance, got 'hover'"),
    ],
)
def test_bad_model_settings_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(CdclError, match=message):
        load_config(None, [f"{key}={value}"])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cdcl.cli",
            "train",
            "--config",
            "configs/monuseg_supervised.yaml",
            "--set",
            f"{key}={value}",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def batches(representation: str, background: bool = False) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g)
    instances = np.zeros((64, 64), np.int32)
    if not background:
        instances[disc((64, 64), (20, 20), 8)] = 1
        instances[disc((64, 64), (40, 44), 9)] = 2
    targets = {k: torch.from_numpy(np.stack([v, v])) for k, v in make_targets(instances, representation).items()}
    weak = torch.rand(2, 3, 64, 64, generator=g)
    return {"image": image, **targets}, {"weak": weak, "strong": weak.flip(-1).flip(-1)}


def models(representation: str):
    config = load_config(None, [*TINY, f"model.instances={representation}"])
    torch.manual_seed(0)
    student = build_model(config.model)
    teacher = build_model(config.model)
    teacher.load_state_dict(student.state_dict())
    return config, student, teacher


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "fixmatch", "cdcl"])
@pytest.mark.parametrize("representation", ["three_class", "distance"])
def test_every_loss_term_is_finite_on_an_all_background_batch(method, representation):
    config, student, teacher = models(representation)
    labeled, unlabeled = batches(representation, background=True)
    overrides = {"name": method, "warmup_iters": 0, "threshold": 0.0, "num_anchors": 64, "num_bank_samples": 64}
    cfg = type(config.method)(**{**config.method.__dict__, **overrides})
    terms = build_method(cfg, representation).losses(student, teacher, labeled, unlabeled, step=5)
    assert all(torch.isfinite(v).all() for v in terms.values()), terms
    terms["total"].backward()


def method_terms(representation: str, method: str, **settings):
    config, student, teacher = models(representation)
    labeled, unlabeled = batches(representation)
    cfg = type(config.method)(
        **{**config.method.__dict__, "name": method, "warmup_iters": 0, "ramp_iters": 0, "threshold": 0.0, **settings}
    )
    torch.manual_seed(1)
    return build_method(cfg, representation).losses(student, teacher, labeled, unlabeled, step=5)


def test_distance_terms_vanish_when_switched_off():
    on = method_terms("distance", "fixmatch")
    assert float(on["cons_dist"].detach()) > 0
    off = method_terms("distance", "fixmatch", instance_consistency=False)
    assert "cons_dist" not in off and torch.equal(off["total"], off["sup"] + off["cons"])
    labeled, _ = batches("distance")
    logits = torch.randn(2, 3, 64, 64)
    plain = F.cross_entropy(logits[:, :2], labeled["target"])
    assert torch.equal(supervised_loss(logits, labeled, "distance", w_distance=0.0), plain)
    assert supervised_loss(logits, labeled, "distance", w_distance=1.0) > plain


def test_three_class_consistency_falls_back_to_nucleus_vs_background():
    on = method_terms("three_class", "mean_teacher")
    off = method_terms("three_class", "mean_teacher", instance_consistency=False)
    assert float(on["cons"].detach()) != float(off["cons"].detach()) and torch.isfinite(off["cons"])


def test_contrastive_boundary_label_changes_only_the_contrastive_term():
    plain = method_terms("three_class", "cdcl", num_anchors=64, num_bank_samples=64, bdp=0.5, fdp=0.5)
    boundary = method_terms(
        "three_class", "cdcl", num_anchors=64, num_bank_samples=64, bdp=0.5, fdp=0.5, contrast_boundary=True
    )
    assert torch.equal(plain["sup"], boundary["sup"]) and torch.equal(plain["cons"], boundary["cons"])
    assert torch.isfinite(boundary["contr"])


GOLDEN = Path(__file__).parent / "golden" / "old_model_prediction.npz"
"""Written by the code before the instance model (commit eaa098a) for the model below: probability and labels."""


def old_model() -> SegmentationModel:
    torch.manual_seed(3)
    return SegmentationModel(
        encoder="resnet18", decoder_channels=(16, 16, 16), feature_channels=16, head_channels=8, embed_dim=8
    ).eval()


def old_checkpoint(tmp_path):
    """A checkpoint as written before the instance model: no output_stride or instances in its config."""
    config = load_config(
        None, [*TINY, "model.output_stride=4", "model.instances=binary", "infer.window=64", "infer.batch_size=2"]
    )
    values = config.to_dict()
    for key in ("output_stride", "instances", "fine_channels"):
        del values["model"][key]
    for key in ("w_distance", "instance_consistency", "contrast_boundary"):
        del values["method"][key]
    state = old_model().state_dict()
    path = tmp_path / "old.pt"
    save_checkpoint(
        path,
        {
            "config": values,
            "predict_with": "teacher",
            "weights": {"student": state, "teacher": state},
            "optimizer": {"state": {}, "param_groups": []},
            "postprocess": None,
            "mpp": 0.25,
        },
    )
    return path


def test_old_checkpoints_still_predict_as_before(tmp_path):
    golden = np.load(GOLDEN)
    predictor = load_predictor(old_checkpoint(tmp_path), device="cpu")
    assert predictor.model.output_stride == 4 and predictor.model.representation == "binary"
    image = (np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)
    prob = sliding_window_probability(
        predictor.model, image, window=predictor.window, overlap=0.25, batch_size=predictor.batch_size
    )
    # Within one float32 ulp, not bitwise: the golden file was written on another CPU, and the convolution's
    # summation order follows the vector instructions the CPU has (3e-8 apart on an AMD EPYC). The labels below
    # stay exact.
    np.testing.assert_allclose(prob, golden["prob"], rtol=0, atol=1e-6)
    params = PostprocessParams(threshold=float(np.quantile(prob, 0.6)), min_size=2)
    assert np.array_equal(instances_from_maps(prob, params), golden["labels"]) and golden["labels"].max() == 26


def test_lean_checkpoint_and_export(tmp_path):
    path = old_checkpoint(tmp_path)
    full = load_checkpoint(path)
    lean = lean_payload(full)
    assert set(lean["weights"]) == {"teacher"} and "optimizer" not in lean
    out = tmp_path / "model.pt"
    done = subprocess.run(
        [sys.executable, "-m", "cdcl.cli", "export", str(path), str(out), "--half"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    exported = load_checkpoint(out)
    assert all(v.dtype == torch.float16 for v in exported["weights"]["teacher"].values() if v.is_floating_point())
    assert out.stat().st_size < 0.6 * path.stat().st_size  # float16 weights of one model
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    half = load_predictor(out, device="cpu")
    assert next(half.model.parameters()).dtype == torch.float32
    a = sliding_window_probability(half.model, image, window=64)
    b = sliding_window_probability(load_predictor(path, device="cpu").model, image, window=64)
    assert np.abs(a - b).max() < 1e-2
    again = subprocess.run(
        [sys.executable, "-m", "cdcl.cli", "export", str(path), str(path)], capture_output=True, text=True
    )
    assert again.returncode == 2 and "overwrite" in again.stderr


def trainer_on_old_run(tmp_path, config):
    """A Trainer (only what ``resume`` reads) on a run folder whose last.pt predates the instance model."""
    from cdcl.training.engine import Trainer

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(old_checkpoint(tmp_path), run / "last.pt")
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.out = config, run
    trainer.dist = type("D", (), {"main": True})()
    return trainer


def test_old_run_folder_cannot_resume_with_the_new_head(tmp_path):
    """Resuming a run of the old model with the new default is a one-line error naming last.pt."""
    trainer = trainer_on_old_run(tmp_path, load_config(None, [*TINY]))
    with pytest.raises(CdclError, match="different model configuration"):
        trainer.resume()


def test_a_nucleus_filling_the_whole_view_has_finite_targets():
    targets = make_targets(np.ones((32, 32), np.int32), "distance")
    assert np.all(targets["distance"] == 1.0)
    assert make_targets(np.ones((32, 32), np.int32), "three_class")["target"].min() == 1  # all interior


def test_old_run_folder_passes_the_model_check_with_the_paper_head(tmp_path):
    """A last.pt from before the instance model (no output_stride/instances stored) is the paper's model: a
    config naming that head gets past the model check (this test file then lacks optimizer state to resume)."""
    sets = [s for s in TINY if not s.startswith("model.fine_channels")]
    config = load_config(None, [*sets, "model.output_stride=4", "model.instances=binary"])
    trainer = trainer_on_old_run(tmp_path, config)
    trainer.student, trainer.teacher = build_model(config.model), build_model(config.model)
    trainer.optimizer = torch.optim.AdamW(trainer.student.parameters())
    trainer.method = build_method(config.method, "binary")
    with pytest.raises(CdclError, match="cannot resume: checkpoint does not match this run"):
        trainer.resume()


def test_a_checkpoint_with_unknown_model_settings_is_a_one_line_error(tmp_path):
    path = old_checkpoint(tmp_path)
    payload = load_checkpoint(path)
    payload["config"]["model"].update(output_stride=3)
    save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    with pytest.raises(CdclError, match="checkpoint model settings are invalid.*output_stride"):
        load_predictor(path, device="cpu")
    with pytest.raises(CdclError, match="model.fine_channels must be >= 1"):
        load_config(None, ["model.fine_channels=0"])
