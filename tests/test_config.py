"""Config loading: presets, YAML, --set overrides, and errors that name the key."""

from __future__ import annotations

import re

import pytest

from cdcl.config import (
    PRESETS,
    DataConfig,
    InferConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from cdcl.errors import CdclError


def test_defaults_use_cpu_small_preset():
    config = load_config(None)
    assert config.preset == "cpu-small"
    assert config.model.encoder == PRESETS["cpu-small"]["model"]["encoder"]
    assert config.augment.crop_size == PRESETS["cpu-small"]["augment"]["crop_size"]


def test_paper_preset_is_densenet161_at_320():
    config = load_config(None, ["preset=paper"])
    assert (config.model.encoder, config.augment.crop_size, config.model.feature_channels, config.model.embed_dim) == (
        "densenet161",
        320,
        256,
        128,
    )


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: cdcl\n  w_contr: 0.5\ntrain:\n  iterations: 10\n")
    config = load_config(path, ["method.w_contr=0", "model.decoder_channels=[8,8,8]", "model.pretrained=/x/w.pth"])
    assert config.method.name == "cdcl"
    assert config.method.w_contr == 0.0 and isinstance(config.method.w_contr, float)
    assert config.train.iterations == 10
    assert config.model.decoder_channels == (8, 8, 8)
    assert config.model.pretrained == "/x/w.pth"


def test_parse_override_nested_and_typed():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("x=false") == {"x": False}
    with pytest.raises(CdclError, match="KEY=VALUE"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.w_contrr=1", "unknown config key 'method.w_contrr'"),
        ("train.iterations=abc", "config key 'train.iterations': expected int, got 'abc'"),
        ("train.iterations=1.5", "expected int"),
        ("method.use_bank=3", "expected bool"),
        ("method.name=nope", "method.name must be one of"),
        ("method.bdp=0.9", "bdp <= method.fdp"),
        ("infer.window=100", "multiple of 32"),
        ("preset=huge", "unknown preset 'huge'"),
        ("augment.scale=[2, 1]", "config section 'augment'"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("method.w_ent=-0.1", "method.w_cons, method.w_ent and method.w_contr must be >= 0"),
        ("method.bank_capacity=-1", "method.bank_capacity must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(CdclError, match=re.escape(message)):
        load_config(None, [override])


def test_sgd_needs_momentum():
    assert load_config(None, ["optim.name=sgd"]).optim.momentum > 0
    with pytest.raises(CdclError, match="optim.momentum must be > 0 with optim.name=sgd"):
        load_config(None, ["optim.name=sgd", "optim.momentum=0"])


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(CdclError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  iterations: 3\n")
    with pytest.raises(CdclError, match=r"typo.yaml: unknown config key 'trian'"):
        load_config(typo)
    with pytest.raises(CdclError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips():
    config = load_config(None, ["method.name=cdcl", "augment.scale=[0.8, 1.25]"])
    again = config_from_dict(config.to_dict())
    assert again == config
    assert "decoder_channels" in dump_config(config)


@pytest.mark.parametrize(
    "section, values, message",
    [
        (DataConfig, {"format": "zip"}, "data.format 'zip' is not folder, monuseg or dsb2018"),
        (ModelConfig, {"output_stride": 3}, "model.output_stride must be one of 1, 2, 4, got 3"),
        (
            ModelConfig,
            {"instances": "hover"},
            "model.instances must be one of binary, three_class, distance, got 'hover'",
        ),
        (ModelConfig, {"fine_channels": 0}, "model.fine_channels must be >= 1"),
        (MethodConfig, {"threshold": 2.0}, "method.threshold must be in [0, 1)"),
        (
            MethodConfig,
            {"name": "x"},
            "method.name must be one of supervised, mean_teacher, fixmatch, cdcl, unimatch, got 'x'",
        ),
        (OptimConfig, {"name": "sgd", "momentum": 0.0}, "optim.momentum must be > 0 with optim.name=sgd"),
        (OptimConfig, {"schedule": "step"}, "optim.schedule must be poly, cosine or constant"),
        (TrainConfig, {"select_by": "loss"}, "train.select_by must be 'aji' or 'dice'"),
        (InferConfig, {"window": 100}, "infer.window must be a positive multiple of 32"),
    ],
)
def test_every_section_validates_itself(section, values, message):
    """A section built in code is held to the rules of one read from YAML, with the same one-line message."""
    with pytest.raises(CdclError) as direct:
        section(**values)
    name = section.__name__.removesuffix("Config").lower()
    with pytest.raises(CdclError) as loaded:
        load_config(None, [f"{name}.{key}={value}" for key, value in values.items()])
    assert str(direct.value) == str(loaded.value)
    assert str(direct.value).startswith(message)
    assert section() == section(**{})  # the defaults pass


def test_vocabulary_fields_take_only_their_names():
    with pytest.raises(CdclError, match=re.escape("config key 'method.name': expected str, got 5")):
        load_config(None, ["method.name=5"])
    with pytest.raises(CdclError, match=re.escape("config key 'model.output_stride': expected int, got True")):
        load_config(None, ["model.output_stride=true"])
    config = load_config(None, ["optim.schedule=cosine", "train.on_nonfinite=skip", "model.output_stride=4"])
    assert (config.optim.schedule, config.train.on_nonfinite, config.model.output_stride) == ("cosine", "skip", 4)
    assert config_from_dict(config.to_dict()) == config


def test_a_stored_config_is_rebuilt_as_written():
    """A checkpoint's config loads even where today's rules refuse a value (the model builder decides)."""
    stored = load_config(None).to_dict()
    stored["model"]["output_stride"] = 3
    assert config_from_dict(stored).model.output_stride == 3
    with pytest.raises(CdclError, match="model.output_stride must be one of"):
        ModelConfig(output_stride=3)  # the stored-config leniency does not leak out of config_from_dict
