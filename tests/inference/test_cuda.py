"""CUDA paths: mixed-precision training, GPU inference against the CPU, a GPU checkpoint used on the CPU.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/inference/test_cuda.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdcl.cli import main
from cdcl.config import load_config
from cdcl.data.synthetic import synthetic_tile
from cdcl.inference.predictor import load_predictor
from cdcl.inference.window import sliding_window_probability, start_probability
from cdcl.training.engine import train

from helpers.training import tiny_dataset, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CDCL run with AMP on the GPU, past warm-up so every loss term runs under autocast."""
    root = tmp_path_factory.mktemp("cuda")
    data, split = tiny_dataset(root)
    overrides = tiny_overrides(
        data,
        split,
        "cdcl",
        iterations=6,
        **{"method.threshold": 0.0, "train.device": "cuda", "train.amp": "true", "train.deterministic": "false"},
    )
    out = root / "run"
    summary = train(load_config(None, overrides), out)
    return out, summary


def test_amp_training_on_cuda_logs_finite_losses_for_every_term(trained):
    out, summary = trained
    assert summary["iterations"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss/total" in r][-1]
    for term in ("sup", "cons", "ent", "contr"):
        assert np.isfinite(last[f"loss/{term}"]), last
    assert last["stat/n_anchors"] > 0


def test_gpu_checkpoint_loads_on_cpu_and_matches_gpu_prediction(trained):
    out, _ = trained
    image = synthetic_tile(np.random.default_rng(3), 160)[0]
    on_cpu = load_predictor(out / "best.pt", "cpu")
    on_gpu = load_predictor(out / "best.pt", "cuda")
    assert next(on_gpu.model.parameters()).is_cuda and not next(on_cpu.model.parameters()).is_cuda
    cpu_prob = sliding_window_probability(on_cpu.model, image, window=64, overlap=0.25)
    gpu_prob = sliding_window_probability(on_gpu.model, image, window=64, overlap=0.25, amp=False)
    amp_prob = sliding_window_probability(on_gpu.model, image, window=64, overlap=0.25, amp=True)
    assert np.abs(cpu_prob - gpu_prob).max() < 1e-3  # fp32 on both: kernels differ, the numbers barely
    assert np.abs(cpu_prob - amp_prob).max() < 0.05  # bf16/fp16 autocast: a few bits of mantissa
    assert np.mean(np.abs(cpu_prob - amp_prob)) < 0.01


def test_predict_cli_on_cuda(trained, tmp_path):
    from PIL import Image

    out, _ = trained
    image = synthetic_tile(np.random.default_rng(4), 128)[0]
    Image.fromarray(image).save(tmp_path / "tile.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(out / "best.pt"),
                str(tmp_path / "tile.png"),
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cuda",
            ]
        )
        == 0
    )
    assert (tmp_path / "pred" / "tile.geojson").exists()


def test_blending_on_the_gpu_equals_blending_in_cpu_memory(trained, monkeypatch):
    """Images up to STITCH_ON_DEVICE_PIXELS are blended on the device (one copy back); larger ones batch by batch
    in CPU memory. Same float32 operations in the same order: the same bits."""
    import cdcl.inference.window

    out, _ = trained
    predictor = load_predictor(out / "best.pt", "cuda")
    image = synthetic_tile(np.random.default_rng(5), 300)[0]
    on_device = sliding_window_probability(predictor.model, image, window=64, overlap=0.25, batch_size=3)
    monkeypatch.setattr(cdcl.inference.window, "STITCH_ON_DEVICE_PIXELS", 0)
    in_host_memory = sliding_window_probability(predictor.model, image, window=64, overlap=0.25, batch_size=3)
    np.testing.assert_array_equal(on_device, in_host_memory)


def test_queueing_an_image_never_waits_for_the_device(trained):
    """``start_probability`` only queues work: an upload from pageable memory, for one, would hold the host until
    the previous tile's forward pass had run, undoing predict-wsi's queue-ahead. PyTorch raises on any
    synchronising call in this mode."""
    out, _ = trained
    predictor = load_predictor(out / "best.pt", "cuda")
    assert predictor.batch_size >= 16
    image = synthetic_tile(np.random.default_rng(6), 300)[0]
    options = {"window": 64, "overlap": 0.25, "batch_size": 3}
    expected = sliding_window_probability(predictor.model, image, **options)  # also makes the cached weight
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = start_probability(predictor.model, image, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_array_equal(pending.result(), expected)


def test_predict_wsi_on_cuda_matches_the_cpu(tmp_path):
    """The GPU pipeline (tiles queued ahead, pinned copies back, post-processing workers) finds the CPU's nuclei."""
    from cdcl.testing.slides import DISCS, DarkStandIn, disc_image, stand_in_predictor
    from cdcl.wsi.pipeline import predict_slide
    from cdcl.wsi.readers import ArrayReader

    image, _ = disc_image()
    cpu = stand_in_predictor()
    gpu = stand_in_predictor(DarkStandIn().cuda())
    gpu.device = torch.device("cuda")
    tables = []
    for name, predictor, workers in (("cpu", cpu, 0), ("gpu", gpu, 2)):
        summary = predict_slide(
            predictor, ArrayReader(image, mpp=0.25), tmp_path / name, stem="s", tile=128, halo=32, workers=workers
        )
        assert summary["nuclei"] == len(DISCS)
        tables.append((tmp_path / name / "s_nuclei.csv").read_text())
    assert tables[0] == tables[1]
