"""Analytic FLOPs of a dense decoder step and the machine's measured matmul peak (for MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def dense_flops_per_token(cfg, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of a dense decoder: 2 per weight
    multiply-add for every matmul weight, plus attention scores and values over the context
    (half of it under a causal mask). Embedding lookups are free; the output head is counted."""
    d, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    h, n, k, f = cfg.head_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    per_layer = d * (n * h) + 2 * d * (k * h) + (n * h) * d + 3 * d * f
    matmul = layers * per_layer + d * v
    context = seq_len / 2 if causal else seq_len
    attention = layers * 2 * n * h * context  # QK^T and PV: 2 * (2 * n h ctx) / 2 per token
    return 3 * (2 * matmul + 2 * attention)


def matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    """The measured FLOP/s of one large square matmul on the default device (best of `repeats`)."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(key, (size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best
