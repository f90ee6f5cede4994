"""Typed experiment configuration: dataclasses <- preset <- YAML file <- ``--set a.b=c`` overrides.

Unknown keys and wrong types are errors naming the key, so a typo never silently trains the wrong thing.
The resolved config is dumped into every run folder and stored in every checkpoint.

Each section checks its own fields when it is built (``__post_init__``, raising a one-line :class:`CdclError`), so a
section constructed in code is held to the same rules as one read from YAML; :func:`validate` keeps the one check
that spans sections. A choice from a closed vocabulary is annotated with its ``Literal``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdcl.data.views import AugmentConfig
from cdcl.errors import CdclError
from cdcl.instances.representations import OUTPUT_STRIDES, REPRESENTATIONS, OutputStride, Representation
from cdcl.vocab import (
    ANCHOR_SOURCES,
    EVAL_MODELS,
    FORMATS,
    METHODS,
    NONFINITE_ACTIONS,
    OPTIMIZERS,
    SCHEDULES,
    SELECT_BY,
    STAIN_NORMS,
    STRONG_VIEWS,
    TTA_MODES,
    AnchorSource,
    DatasetFormat,
    EvalModel,
    MethodName,
    NonfiniteAction,
    OptimizerName,
    ScheduleName,
    SelectBy,
    StainNorm,
    TtaMode,
    spoken,
)

_STORED: contextvars.ContextVar[bool] = contextvars.ContextVar("cdcl_config_stored", default=False)


@contextlib.contextmanager
def _stored() -> Iterator[None]:
    """Within: sections skip their own checks (a config stored in a checkpoint is rebuilt as it was written)."""
    token = _STORED.set(True)
    try:
        yield
    finally:
        _STORED.reset(token)


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed ``(condition, message)`` check (a section's ``__post_init__``)."""
    if _STORED.get():
        return
    for ok, message in checks:
        if not ok:
            raise CdclError(message)


@dataclass
class DataConfig:
    root: str = ""  # dataset folder; relative paths are taken from the current directory
    format: DatasetFormat = "folder"  # cdcl.vocab.FORMATS: folder | monuseg | dsb2018
    split_dir: str = ""  # folder with labeled.txt, unlabeled.txt, val.txt (written by `cdcl split`)
    unlabeled_root: str = ""  # a folder of unannotated images (images/, e.g. from `cdcl tiles`), all added as unlabeled
    mpp: float | None = None  # microns per pixel of the training images, stored for slide inference
    batch_size: int = 8  # labeled images per step
    unlabeled_batch_size: int = 8  # unlabeled images per step (semi-supervised methods)
    num_workers: int = 2
    stain_norm: StainNorm = "none"  # cdcl.vocab.STAIN_NORMS: recolour every image to the labeled images' stain

    def __post_init__(self) -> None:
        _require(
            [
                (self.num_workers >= 0, "data.num_workers must be >= 0"),
                (
                    self.stain_norm in STAIN_NORMS,
                    f"data.stain_norm '{self.stain_norm}' is not {spoken(STAIN_NORMS, quote=chr(39))}",
                ),
                (self.format in FORMATS, f"data.format '{self.format}' is not {spoken(FORMATS)}"),
                (self.batch_size >= 1 and self.unlabeled_batch_size >= 1, "data batch sizes must be >= 1"),
            ]
        )


@dataclass
class ModelConfig:
    encoder: str = "resnet18"  # any timm model name that supports features_only
    pretrained: bool | str = False  # False, True (timm hub: needs internet) or a local weights file
    decoder_channels: tuple[int, int, int] = (256, 128, 64)  # widths of the three upsampling stages
    feature_channels: int = 256  # width of the 1/4-resolution feature map shared by both heads
    head_channels: int = 64  # classifier hidden width
    embed_dim: int = 128  # projector output (dense embedding) width
    dropout: float = 0.3  # classifier dropout, training mode only
    pool_projector: bool = False  # average-pool features 2x before the projector (labels pooled alike)
    output_stride: OutputStride = 1  # classifier resolution: 1 (input), 2 or 4 (paper's model, upsampled bilinearly)
    fine_channels: int = 32  # decoder width at stride 2 (output_stride < 4)
    instances: Representation = "three_class"  # instance representation: binary | three_class | distance

    def __post_init__(self) -> None:
        _require(
            [
                (0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)"),
                (
                    self.output_stride in OUTPUT_STRIDES,
                    f"model.output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got "
                    f"{self.output_stride}",
                ),
                (
                    self.instances in REPRESENTATIONS,
                    f"model.instances must be one of {', '.join(REPRESENTATIONS)}, got '{self.instances}'",
                ),
                (self.fine_channels >= 1, "model.fine_channels must be >= 1"),
            ]
        )


@dataclass
class MethodConfig:
    name: MethodName = "supervised"  # cdcl.vocab.METHODS: supervised | mean_teacher | fixmatch | cdcl | unimatch
    ema_decay: float = 0.99  # teacher = EMA of the student, alpha_t = min(1 - 1/(t+1), ema_decay)
    warmup_iters: int = 200  # supervised-only iterations before unlabeled terms start (paper: epoch_semi)
    ramp_iters: int = 400  # sigmoid ramp-up length of the consistency weight, counted after warm-up
    threshold: float = 0.9  # teacher confidence needed for a pixel's pseudo-label to count
    w_cons: float = 1.0  # consistency (or FixMatch pseudo-label) weight at the end of the ramp
    w_ent: float = 0.05  # entropy-minimisation weight (cdcl)
    w_contr: float = 0.1  # dense contrastive weight (cdcl); 0 switches the term off
    grid: int = 4  # embedding map split into grid x grid patches
    bdp: float = 0.2  # background-dominant patch: foreground ratio <= bdp
    fdp: float = 0.8  # foreground-dominant patch: foreground ratio >= fdp
    temperature: float = 0.1
    patch_filter: bool = True  # only background/foreground-dominant patches give anchors
    pseudo_label_filter: bool = True  # only teacher-confident pixels become anchors and bank entries
    use_bank: bool = True  # cross-iteration memory bank; False = negatives from the current batch only
    bank_capacity: int = 4  # earlier iterations kept in the memory bank, besides the current one (0: current only)
    num_anchors: int = 1024  # anchors sampled per step (<= 0, or more than the step has: all of them, exact mode)
    num_bank_samples: int = 2048  # student and teacher entries each pushed per step (<= 0, or more than there are: all)
    anchor_source: AnchorSource = "student"  # labels/ratios of anchors from the "student" (release) or "teacher"
    use_consistency: bool = True
    use_entropy: bool = True
    w_distance: float = 1.0  # supervised distance-map regression weight (model.instances=distance)
    boundary_weight: float = 3.0  # cross-entropy weight of the thin boundary class (model.instances=three_class)
    instance_consistency: bool = True  # consistency on the instance channels too (boundary class, distance map)
    contrast_boundary: bool = False  # cdcl: boundary pixels are their own contrastive label (three_class)
    strong_views: int = 2  # unimatch: strong views per unlabeled image (1 or 2), each its own photometric draw
    feature_dropout: float = 0.5  # unimatch: channel dropout of the feature-perturbation stream; 0 = stream off
    cutmix_prob: float = 0.5  # unimatch: chance a strong view gets a box of another unlabeled image (CutMix)

    def __post_init__(self) -> None:
        _require(
            [
                (
                    min(self.w_cons, self.w_ent, self.w_contr) >= 0,
                    "method.w_cons, method.w_ent and method.w_contr must be >= 0",
                ),
                (
                    self.warmup_iters >= 0 and self.bank_capacity >= 0,
                    "method.warmup_iters and method.bank_capacity must be >= 0",
                ),
                (self.name in METHODS, f"method.name must be one of {', '.join(METHODS)}, got '{self.name}'"),
                (
                    self.w_distance >= 0 and self.boundary_weight > 0,
                    "method.w_distance must be >= 0 and method.boundary_weight > 0",
                ),
                (0.0 <= self.threshold < 1.0, "method.threshold must be in [0, 1)"),
                (0.0 <= self.bdp <= self.fdp <= 1.0, "method.bdp <= method.fdp must hold, both in [0, 1]"),
                (0.0 <= self.ema_decay < 1.0, "method.ema_decay must be in [0, 1)"),
                (self.temperature > 0, "method.temperature must be > 0"),
                (self.grid >= 1, "method.grid must be >= 1"),
                (
                    1 <= self.strong_views <= len(STRONG_VIEWS),
                    f"method.strong_views must be in [1, {len(STRONG_VIEWS)}]",
                ),
                (
                    0.0 <= self.feature_dropout < 1.0 and 0.0 <= self.cutmix_prob <= 1.0,
                    "method.feature_dropout must be in [0, 1) and method.cutmix_prob in [0, 1]",
                ),
                (
                    self.anchor_source in ANCHOR_SOURCES,
                    f"method.anchor_source must be {spoken(ANCHOR_SOURCES, quote=chr(39))}",
                ),
            ]
        )


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"  # cdcl.vocab.OPTIMIZERS: adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: ScheduleName = "poly"  # cdcl.vocab.SCHEDULES: poly | cosine | constant
    warmup_iters: int = 0  # linear LR warm-up
    grad_clip: float = 5.0  # max gradient norm; <= 0 disables

    def __post_init__(self) -> None:
        _require(
            [
                (
                    self.name != "sgd" or self.momentum > 0,
                    "optim.momentum must be > 0 with optim.name=sgd (Nesterov momentum)",
                ),
                (self.name in OPTIMIZERS, f"optim.name must be {spoken(OPTIMIZERS, quote=chr(39))}"),
                (self.schedule in SCHEDULES, f"optim.schedule must be {spoken(SCHEDULES)}"),
                (self.lr > 0, "optim.lr must be > 0"),
            ]
        )


@dataclass
class TrainConfig:
    iterations: int = 2000
    val_every: int = 200
    log_every: int = 20
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (CPU runs reproduce bit-for-bit)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision where the device supports it (CUDA)
    on_nonfinite: NonfiniteAction = "stop"  # stop | skip: what a NaN/inf loss does
    max_skipped: int = 20  # with on_nonfinite=skip, stop after this many skipped steps
    eval_model: EvalModel = "ema"  # ema | student: the weights validated and saved as best.pt
    tune_postprocess: bool = True  # tune instance thresholds on the val split after training
    select_by: SelectBy = "aji"  # aji | dice: the validation score that picks best.pt (AJI at default post-processing)

    def __post_init__(self) -> None:
        _require(
            [
                (self.iterations >= 1, "train.iterations must be >= 1"),
                (self.val_every >= 1 and self.log_every >= 1, "train.val_every and train.log_every must be >= 1"),
                (
                    self.on_nonfinite in NONFINITE_ACTIONS,
                    f"train.on_nonfinite must be {spoken(NONFINITE_ACTIONS, quote=chr(39))}",
                ),
                (self.eval_model in EVAL_MODELS, f"train.eval_model must be {spoken(EVAL_MODELS, quote=chr(39))}"),
                (self.select_by in SELECT_BY, f"train.select_by must be {spoken(SELECT_BY, quote=chr(39))}"),
            ]
        )


@dataclass
class InferConfig:
    window: int = 256  # sliding-window side (multiple of 32)
    overlap: float = 0.25
    batch_size: int = 4
    tta: TtaMode = "none"  # cdcl.vocab.TTA_MODES: test-time augmentation averaged (cdcl.inference.tta)

    def __post_init__(self) -> None:
        _require(
            [
                (self.window % 32 == 0 and self.window > 0, "infer.window must be a positive multiple of 32"),
                (0.0 <= self.overlap < 1.0, "infer.overlap must be in [0, 1)"),
                (self.tta in TTA_MODES, f"infer.tta must be {spoken(TTA_MODES, quote=chr(39))}, got {self.tta!r}"),
            ]
        )


@dataclass
class Config:
    preset: str = "cpu-small"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Small encoder, light decoder, small crops: a MoNuSeg run converges in ~30 min on 2 CPU cores.
    "cpu-small": {
        "model": {
            "encoder": "resnet18",
            "decoder_channels": [128, 64, 32],
            "feature_channels": 64,
            "head_channels": 32,
            "embed_dim": 64,
        },
        "augment": {"crop_size": 128},
        "data": {"batch_size": 8, "unlabeled_batch_size": 8},
        "infer": {"window": 256, "batch_size": 4},
    },
    # The published sizes: ImageNet DenseNet-161, 320 crops, 256-channel features, 128-d embeddings (GPU). The head
    # is the instance model; the paper's own head is model.output_stride=4 with model.instances=binary.
    "paper": {
        "model": {
            "encoder": "densenet161",
            "decoder_channels": [256, 256, 256],
            "feature_channels": 256,
            "head_channels": 64,
            "embed_dim": 128,
        },
        "augment": {"crop_size": 320},
        "data": {"batch_size": 8, "unlabeled_batch_size": 8},
        "infer": {"window": 320, "batch_size": 8},
    },
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except CdclError:
                continue
        raise CdclError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is typing.Literal:
        # Only the type here (a Literal of strings takes any string): whether the value is one of the choices is the
        # section's own check (__post_init__), whose message lists them; a stored config is rebuilt without it.
        kinds = {type(arg) for arg in typing.get_args(tp)}
        if len(kinds) != 1:
            raise TypeError(f"unsupported config annotation {tp!r} for {key}")
        return _coerce(value, kinds.pop(), key)
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise CdclError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, validating keys and types."""
    if not isinstance(values, dict):
        raise CdclError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise CdclError(f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(names)})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise CdclError(f"config section '{prefix.rstrip('.') or '<root>'}': {exc}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}``; the value is parsed as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CdclError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def resolve_config(values: dict[str, Any]) -> Config:
    """Apply the preset named in ``values`` (default cpu-small) under ``values`` and validate."""
    preset = values.get("preset", Config.preset)
    if preset not in PRESETS:
        raise CdclError(f"unknown preset '{preset}' (valid: {', '.join(PRESETS)})")
    merged = _merge(PRESETS[preset], values)
    config = _build(Config, merged, "")
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``--set`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise CdclError("config file not found", path) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CdclError(f"cannot read config ({exc})", path) from None
        except yaml.YAMLError as exc:
            raise CdclError(f"invalid YAML ({exc})", path) from None  # CdclError makes it one line
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise CdclError("config must be a YAML mapping", path)
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    try:
        return resolve_config(values)
    except CdclError as err:
        if path is not None and err.path is None:
            raise CdclError(err.problem, path) from None
        raise


LEGACY_MODEL = {"output_stride": 4, "instances": "binary"}
"""What a stored config without these keys (a checkpoint from before they existed) was: the paper's model."""


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a resolved config (e.g. stored in a checkpoint) without re-applying a preset.

    Keys and types are checked as always; the sections' value checks are not, so a file written under older rules
    still loads (the model builder refuses a setting it cannot build)."""
    model = values.get("model")
    if isinstance(model, dict) and "output_stride" not in model:
        values = {**values, "model": {**LEGACY_MODEL, **model}}
    with _stored():
        return _build(Config, values, "")


def validate(config: Config) -> None:
    """The checks that span sections; each section checks its own fields when built (``__post_init__``).

    ``augment.crop_size`` is here, not in :class:`AugmentConfig`: views of any size are fine, but the model's
    encoder downsamples by 32."""
    _require([(config.augment.crop_size % 32 == 0, "augment.crop_size must be a multiple of 32")])


def dump_config(config: Config) -> str:
    """The resolved config as YAML (tuples written as lists)."""
    return yaml.safe_dump(_plain(config.to_dict()), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
