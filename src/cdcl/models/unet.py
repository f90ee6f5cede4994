"""Encoder (any timm backbone, ``features_only``) + U-Net-like decoder + classifier and projector heads.

Follows PAPER.md: three upsampling steps add the encoder's skip features back and end at 1/4 of the input
size; the classifier gives two-class logits, the projector L2-normalised dense embeddings.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdcl.errors import CdclError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16, 32)  # encoder levels the decoder uses; the output sits at stride 4


def conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Upsample 2x, concatenate the skip feature, two 3x3 convs."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(cin + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class ClassifierHead(nn.Module):
    """3x3 conv, BN, ReLU, dropout (training mode only: the release applied it at test time too), 1x1 conv."""

    def __init__(self, cin: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.body = conv_bn_relu(cin, hidden)
        self.dropout = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(hidden, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(self.body(x)))


class ProjectorHead(nn.Module):
    """1x1 conv, ReLU, 1x1 conv, per-pixel L2 normalisation; optional 2x average pooling first."""

    def __init__(self, cin: int, dim: int, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.body = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(inplace=True), nn.Conv2d(cin, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.pool:
            x = F.avg_pool2d(x, 2)
        return F.normalize(self.body(x), dim=1)


def create_encoder(name: str, pretrained: bool | str) -> nn.Module:
    """A timm backbone returning features at strides 4, 8, 16, 32; helpful errors for bad names/weights."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "e.g. resnet18, resnet34, densenet161, efficientnet_b0"
        raise CdclError(f"unknown encoder '{name}' ({hint}; all names: python -c 'import timm; print(timm.list_models())')")
    kwargs: dict = {"features_only": True, "pretrained": bool(pretrained)}
    path = None
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise CdclError("config key 'model.pretrained': weights file not found", path)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        encoder = timm.create_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm and the hub raise many types; each is a one-line user error
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if not pretrained:  # features_only unsupported by this architecture
            raise CdclError(f"cannot build encoder '{name}' ({detail})") from None
        source = "this file" if path else "the Hugging Face hub (needs the network)"
        raise CdclError(f"config key 'model.pretrained': cannot load '{name}' weights from {source}; use a local "
                        f"weights file or model.pretrained=false ({detail})", path) from None
    reductions = encoder.feature_info.reduction()
    missing = [s for s in STRIDES if s not in reductions]
    if missing:
        raise CdclError(f"encoder '{name}' has no features at strides {missing} (has {reductions})")
    return encoder


class SegmentationModel(nn.Module):
    """``forward(x)`` takes RGB in [0, 1] (normalised inside, so a checkpoint alone is enough to predict)."""

    def __init__(self, encoder: str = "resnet18", pretrained: bool | str = False, decoder_channels: tuple[int, int, int] = (256, 128, 64),
                 feature_channels: int = 256, head_channels: int = 64, embed_dim: int = 128, dropout: float = 0.3,
                 pool_projector: bool = False, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = create_encoder(encoder, pretrained)
        reductions = self.encoder.feature_info.reduction()
        channels = self.encoder.feature_info.channels()
        self.levels = [reductions.index(s) for s in STRIDES]
        c4, c8, c16, c32 = (channels[i] for i in self.levels)
        d16, d8, d4 = decoder_channels
        self.up16 = UpBlock(c32, c16, d16)
        self.up8 = UpBlock(d16, c8, d8)
        self.up4 = UpBlock(d8, c4, d4)
        self.fuse = conv_bn_relu(d4, feature_channels, kernel=1)
        self.classifier = ClassifierHead(feature_channels, head_channels, num_classes, dropout)
        self.projector = ProjectorHead(feature_channels, embed_dim, pool_projector)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> Tensor:
        """The 1/4-resolution feature map shared by both heads."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"input height and width must be multiples of 32, got {tuple(x.shape[-2:])}; pad to "
                             f"{tuple(-(-s // 32) * 32 for s in x.shape[-2:])}")
        feats = self.encoder((x - self.mean) / self.std)
        f4, f8, f16, f32 = (feats[i] for i in self.levels)
        return self.fuse(self.up4(self.up8(self.up16(f32, f16), f8), f4))

    def forward(self, x: Tensor, embeddings: bool = False) -> dict[str, Tensor]:
        """``logits`` at input size, ``logits_lowres`` at 1/4; ``embeddings`` (B, D, h, w) when asked."""
        feat = self.features(x)
        low = self.classifier(feat)
        out = {"logits_lowres": low, "logits": F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)}
        if embeddings:
            out["embeddings"] = self.projector(feat)
        return out


def build_model(cfg) -> SegmentationModel:
    """Build from a ``cdcl.config.ModelConfig`` (or anything with the same fields)."""
    return SegmentationModel(encoder=cfg.encoder, pretrained=cfg.pretrained, decoder_channels=tuple(cfg.decoder_channels),
                             feature_channels=cfg.feature_channels, head_channels=cfg.head_channels, embed_dim=cfg.embed_dim,
                             dropout=cfg.dropout, pool_projector=cfg.pool_projector)
