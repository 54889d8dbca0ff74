"""Tiny random transformers models built in the tests (no download) and comparison helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import distill


def tiny_hf(family: str, *, tied=False, heads=4, kv_heads=2, hidden=64, rope_scaling=None,
            layers=2, vocab=160, seed=0):
    """A random float32 transformers Qwen2/Llama causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              tie_word_embeddings=tied, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, rms_norm_eps=1e-6))
    else:
        if rope_scaling:
            kw["rope_scaling"] = rope_scaling
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_theta=500000.0, rms_norm_eps=1e-5))
    model = model.float().eval()
    with torch.no_grad():  # random biases and norm weights, so a missed tensor shows up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def load(path):
    model, _ = distill.load_pretrained(path)
    return model


def run_cli(args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`distill ARGS` in a fresh interpreter, as a user runs it (stdout, stderr captured)."""
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)

