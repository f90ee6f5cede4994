"""Config loading: presets, YAML, --set overrides, and errors that name the key."""

from __future__ import annotations

import re

import pytest

from cdcl.config import PRESETS, config_from_dict, dump_config, load_config, parse_override
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
