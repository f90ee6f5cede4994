"""Encoder (any timm backbone, ``features_only``) + U-Net-like decoder + classifier and projector heads.

Follows PAPER.md: three upsampling steps add the encoder's skip features back and end at 1/4 of the input
size, where the projector gives L2-normalised dense embeddings. With ``output_stride`` 4 (the paper's model)
the classifier works there too and its logits are upsampled bilinearly. With 2 or 1 a light decoder continues to
stride 2 (the encoder's stride-2 features as a skip where it has them) and the classifier works there: at
output stride 2 its logits are upsampled bilinearly, at 1 it predicts each 2x2 block of input pixels (sub-pixel
convolution, ``pixel_shuffle``), so a 1-px gap between touching nuclei can be drawn at the input resolution
without paying for convolutions there. The classifier's channels follow the instance representation
(``cdcl.instances.representations``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdcl.errors import CdclError, squashed
from cdcl.instances.representations import OUTPUT_CHANNELS, OUTPUT_STRIDES, check_representation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDES = (4, 8, 16, 32)  # encoder levels the decoder uses; the shared feature map sits at stride 4
SKIP2_CHANNELS = 16  # the encoder's stride-2 features, projected to this width before the fine decoder


def conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class UpBlock(nn.Module):
    """Upsample 2x, concatenate the skip feature, two 3x3 convs."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(cin + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class FineDecoder(nn.Module):
    """Stride 4 -> stride 2: the shared features reduced (1x1) and upsampled, the encoder's stride-2 features
    (projected to ``SKIP2_CHANNELS``, where it has them) concatenated, one 3x3 conv. Light on purpose: a wider
    block cost more than the whole encoder on CPU (``benchmarks/speed.py``)."""

    def __init__(self, cin: int, skip2: int, channels: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(cin, channels, kernel=1)
        self.skip = conv_bn_relu(skip2, SKIP2_CHANNELS, kernel=1) if skip2 else None
        self.conv = conv_bn_relu(channels + (SKIP2_CHANNELS if skip2 else 0), channels)

    def forward(self, x: Tensor, skip2: Tensor | None, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(self.reduce(x), size=size, mode="bilinear", align_corners=False)
        if self.skip is not None and skip2 is not None:
            x = torch.cat([x, self.skip(skip2)], dim=1)
        return self.conv(x)


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
        hint = (
            f"close matches: {', '.join(close)}" if close else "e.g. resnet18, resnet34, densenet161, efficientnet_b0"
        )
        raise CdclError(
            f"unknown encoder '{name}' ({hint}; all names: python -c 'import timm; print(timm.list_models())')"
        )
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
        detail = f"{type(exc).__name__}: {squashed(exc, 300)}"
        if not pretrained:  # features_only unsupported by this architecture
            raise CdclError(f"cannot build encoder '{name}' ({detail})") from None
        source = "this file" if path else "the Hugging Face hub (needs the network)"
        raise CdclError(
            f"config key 'model.pretrained': cannot load '{name}' weights from {source}; use a local "
            f"weights file or model.pretrained=false ({detail})",
            path,
        ) from None
    reductions = encoder.feature_info.reduction()
    missing = [s for s in STRIDES if s not in reductions]
    if missing:
        raise CdclError(f"encoder '{name}' has no features at strides {missing} (has {reductions})")
    return encoder


class SegmentationModel(nn.Module):
    """``forward(x)`` takes RGB in [0, 1] (normalised inside, so a checkpoint alone is enough to predict)."""

    def __init__(
        self,
        encoder: str = "resnet18",
        pretrained: bool | str = False,
        decoder_channels: tuple[int, int, int] = (256, 128, 64),
        feature_channels: int = 256,
        head_channels: int = 64,
        embed_dim: int = 128,
        dropout: float = 0.3,
        pool_projector: bool = False,
        output_stride: int = 4,
        representation: str = "binary",
        fine_channels: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        self.representation = check_representation(representation)
        self.output_stride = output_stride
        self.encoder = create_encoder(encoder, pretrained)
        reductions = self.encoder.feature_info.reduction()
        channels = self.encoder.feature_info.channels()
        self.levels = [reductions.index(s) for s in STRIDES]
        self.level2 = reductions.index(2) if 2 in reductions else None
        c4, c8, c16, c32 = (channels[i] for i in self.levels)
        d16, d8, d4 = decoder_channels
        self.up16 = UpBlock(c32, c16, d16)
        self.up8 = UpBlock(d16, c8, d8)
        self.up4 = UpBlock(d8, c4, d4)
        self.fuse = conv_bn_relu(d4, feature_channels, kernel=1)
        head_in, outputs = feature_channels, OUTPUT_CHANNELS[representation]
        if output_stride < 4:
            skip2 = channels[self.level2] if self.level2 is not None else 0
            self.fine = FineDecoder(feature_channels, skip2, fine_channels)
            head_in = fine_channels
        self.classifier = ClassifierHead(head_in, head_channels, outputs * (4 if output_stride == 1 else 1), dropout)
        self.projector = ProjectorHead(feature_channels, embed_dim, pool_projector)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _encode(self, x: Tensor) -> list[Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(
                f"input height and width must be multiples of 32, got {tuple(x.shape[-2:])}; pad to "
                f"{tuple(-(-s // 32) * 32 for s in x.shape[-2:])}"
            )
        return self.encoder((x - self.mean) / self.std)

    def _decode(self, feats: list[Tensor]) -> Tensor:
        f4, f8, f16, f32 = (feats[i] for i in self.levels)
        return self.fuse(self.up4(self.up8(self.up16(f32, f16), f8), f4))

    def features(self, x: Tensor) -> Tensor:
        """The 1/4-resolution feature map shared by the projector (and the classifier at output stride 4)."""
        return self._decode(self._encode(x))

    def forward(
        self, x: Tensor, embeddings: bool = False, feature_dropout: float = 0.0, perturbed: int = 0
    ) -> dict[str, Tensor]:
        """``logits`` at input size; ``logits_lowres`` at 1/4 (output stride 4 only); ``embeddings`` (B, D, h, w)
        at 1/4 when asked.

        The last ``perturbed`` images of the batch are decoded from encoder features with whole channels dropped
        at rate ``feature_dropout`` (UniMatch's feature perturbation): inside the one forward pass, so a method
        under DDP still calls the model once per step.
        """
        feats = self._encode(x)
        if perturbed and feature_dropout > 0:
            keep = x.shape[0] - perturbed
            feats = [torch.cat([f[:keep], F.dropout2d(f[keep:], feature_dropout)]) for f in feats]
        feat = self._decode(feats)
        size = x.shape[-2:]
        if self.output_stride == 4:
            low = self.classifier(feat)
            out = {"logits_lowres": low, "logits": F.interpolate(low, size=size, mode="bilinear", align_corners=False)}
        else:
            skip2 = feats[self.level2] if self.level2 is not None else None
            logits = self.classifier(self.fine(feat, skip2, (size[0] // 2, size[1] // 2)))
            if self.output_stride == 1:
                logits = F.pixel_shuffle(logits, 2)
            else:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            out = {"logits": logits}
        if embeddings:
            out["embeddings"] = self.projector(feat)
        return out


def build_model(cfg) -> SegmentationModel:
    """Build from a ``cdcl.config.ModelConfig`` (or anything with the same fields)."""
    return SegmentationModel(
        encoder=cfg.encoder,
        pretrained=cfg.pretrained,
        decoder_channels=tuple(cfg.decoder_channels),
        feature_channels=cfg.feature_channels,
        head_channels=cfg.head_channels,
        embed_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        pool_projector=cfg.pool_projector,
        output_stride=cfg.output_stride,
        representation=cfg.instances,
        fine_channels=cfg.fine_channels,
    )
