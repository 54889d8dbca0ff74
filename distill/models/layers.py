"""Building blocks shared by the dense students and the MoE teacher: parameters with logical
sharding names, RMS norm, the gated (SwiGLU) MLP and the named remat policies.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# ---------------------------------------------------------------------------------------------
# Parameters



def param(
    key: jax.Array,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype,
    init: str | Callable = "normal",
    scale: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names, one per dimension (see `distill.parallel` for the rules)."""
    assert len(shape) == len(names), (shape, names)
    if init == "normal":
        value = scale * jax.random.normal(key, shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = init(key, shape)
    # eager_sharding=False: the model never names a mesh; placement comes from the rules table.
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Norms



def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 like transformers (normalise in f32, cast, then scale)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Gated MLP



def swiglu(x_btd: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array, w_down_fd: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) over the last axis of x, in x's dtype."""
    dt = x_btd.dtype
    gate = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dt))
    up = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dt))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_fd.astype(dt))


# ---------------------------------------------------------------------------------------------
# Remat



REMAT_POLICIES: dict[str, Callable | None] = {  # the names of distill.config.RematName
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap a scan body with the named rematerialisation policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
