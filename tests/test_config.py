"""Configs: validation names the key and the file; overrides; frozen objects."""

import pydantic
import pytest

from distill.config import apply_overrides, parse_overrides
from distill.errors import DistillError
from distill.models.families import load_model_config
from distill.models.llama.config import DenseConfig

TINY = "configs/students/tiny-llama.yaml"


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({"model": {"a": 1}}, parse_overrides(["model.b=2.5", "x.y.z=[1, 2]",
                                                                 "model.a=true"]))
    assert data == {"model": {"a": True, "b": 2.5}, "x": {"y": {"z": [1, 2]}}}


def test_override_changes_a_field_and_keeps_the_rest():
    cfg = load_model_config(TINY, ["model.num_hidden_layers=5", "model.rope_scaling.factor=4"])
    assert cfg.num_hidden_layers == 5 and cfg.rope_scaling.factor == 4.0
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.hidden_size == 64


@pytest.mark.parametrize("override, message", [
    ("model.hidden_sise=3", "model.hidden_sise: unknown key"),
    ("model.rope_scaling.rope_type=ntk", "model.rope_scaling.rope_type"),
    ("model.tie_word_embeddings=maybe", "model.tie_word_embeddings"),
    ("model.num_key_value_heads=3", "num_key_value_heads"),
])
def test_bad_values_name_the_key_and_file(override, message):
    with pytest.raises(DistillError) as e:
        load_model_config(TINY, [override])
    assert message in str(e.value) and TINY in str(e.value) and "\n" not in str(e.value)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(DistillError, match="KEY=VALUE"):
        load_model_config(TINY, ["model.hidden_size"])
    with pytest.raises(DistillError, match="not found"):
        load_model_config("configs/students/nope.yaml")


def test_configs_are_frozen_and_hashable():
    cfg = load_model_config(TINY)
    with pytest.raises(pydantic.ValidationError):
        cfg.hidden_size = 3
    assert hash(cfg) == hash(DenseConfig(**cfg.model_dump()))


def test_remat_names_are_the_policies_the_model_implements():
    import typing

    from distill.models.config import RematName
    from distill.models.layers import REMAT_POLICIES

    assert set(typing.get_args(RematName)) == set(REMAT_POLICIES)
