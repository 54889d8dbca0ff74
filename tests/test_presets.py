"""Presets: parameter counts from jax.eval_shape (no allocation) equal transformers' on meta."""

import pytest
import torch

from distill.models.families import load_model_config, param_count
from distill.models.llama.hf import config_to_hf

# Parameter totals, computed from each model's public config.json on huggingface.co (Qwen2's
# q/k/v projections have biases, Llama has none) and equal to the safetensors totals Hugging Face
# publishes where one was checked (deepseek-ai/DeepSeek-R1-Distill-Llama-8B: 8,030,261,248;
# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B: 32,763,876,352). The R1-Distill students share these
# shapes: Qwen2.5-Math-1.5B / -7B, Llama-3.1-8B, Qwen2.5-14B / -32B, Llama-3.3-70B-Instruct.
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
    # DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B plus an untied 151,936 x 1,536 head
    assert param_count(cfg) == 1_777_088_000 == PRESETS["qwen2.5-math-1.5b"] + 151_936 * 1_536
