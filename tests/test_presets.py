"""Presets: parameter counts from jax.eval_shape (no allocation) equal transformers' on meta."""

import pytest
import torch

from distill.models.families import load_model_config, param_count
from distill.models.llama.hf import config_to_hf

# Published totals (shared/reference/model-configs.md, from the HF safetensors metadata).
PRESETS = {
    "qwen2.5-math-1.5b": 1_543_714_304,
    "qwen2.5-math-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "llama-3.3-70b-instruct": 70_553_706_496,
}


def _transformers_count(config_json: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config_json)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count(name):
    cfg = load_model_config(f"configs/students/{name}.yaml")
    ours = param_count(cfg)
    theirs = _transformers_count(config_to_hf(cfg))
    assert ours == theirs == PRESETS[name]


def test_r1_distill_qwen_1p5b_unties_the_head():
    cfg = load_model_config("configs/students/qwen2.5-math-1.5b.yaml",
                            ["model.tie_word_embeddings=false"])
    assert param_count(cfg) == 1_777_088_000
