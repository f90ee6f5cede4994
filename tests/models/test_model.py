"""The segmentation model: shapes, heads, dropout only in training, encoder registry, local weights."""

from __future__ import annotations

import pytest
import timm
import torch

from cdcl.errors import CdclError
from cdcl.models.unet import SegmentationModel

TINY = dict(encoder="resnet18", decoder_channels=(16, 16, 16), feature_channels=16, head_channels=8, embed_dim=8)


def test_shapes_and_normalised_embeddings():
    model = SegmentationModel(**TINY).eval()
    out = model(torch.rand(2, 3, 64, 96), embeddings=True)
    assert out["logits"].shape == (2, 2, 64, 96)
    assert out["logits_lowres"].shape == (2, 2, 16, 24)
    assert out["embeddings"].shape == (2, 8, 16, 24)
    norms = out["embeddings"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_pooled_projector_halves_embedding_resolution():
    model = SegmentationModel(**TINY, pool_projector=True).eval()
    assert model(torch.rand(1, 3, 64, 64), embeddings=True)["embeddings"].shape == (1, 8, 8, 8)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = SegmentationModel(**TINY, dropout=0.5)
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x)["logits"], model(x)["logits"])
    model.train()
    assert not torch.equal(model(x)["logits"], model(x)["logits"])


def test_input_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match=r"multiples of 32.*\(64, 96\)"):
        SegmentationModel(**TINY)(torch.rand(1, 3, 50, 90))


def test_unknown_encoder_lists_close_names():
    with pytest.raises(CdclError, match="unknown encoder 'resnet181'.*resnet18"):
        SegmentationModel(**{**TINY, "encoder": "resnet181"})


def test_local_weights_file_is_loaded(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.125)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = SegmentationModel(**{**TINY, "pretrained": str(path)})
    assert torch.all(model.encoder.conv1.weight == 0.125)
    with pytest.raises(CdclError, match="weights file not found"):
        SegmentationModel(**{**TINY, "pretrained": str(tmp_path / "none.pth")})
