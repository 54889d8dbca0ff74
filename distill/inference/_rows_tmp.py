"""TEMPORARY stand-ins for distill.sampling's per-row functions (replaced on merge)."""
import jax
import jax.numpy as jnp


def request_key(seed: int, sample_index: int):
    return jax.random.fold_in(jax.random.PRNGKey(seed), sample_index)


def row_uniform(key_b2, step_b):
    return jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s)))(key_b2, step_b)


def sample_rows(logits_bv, uniform_b, temperature_b, top_k_b, top_p_b):
    logits = logits_bv.astype(jnp.float32) / jnp.maximum(temperature_b, 1e-6)[:, None]
    p = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(p, axis=-1)
    idx = jnp.sum(cdf < uniform_b[:, None] * cdf[:, -1:], axis=-1)
    idx = jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)
    return jnp.where(temperature_b == 0, jnp.argmax(logits_bv, -1).astype(jnp.int32), idx)
