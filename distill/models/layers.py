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
# KV-cache slots


def write_slots(cache: jax.Array, new: jax.Array, index, axis: int) -> jax.Array:
    """Write `new` (T entries on `axis`) into `cache` from slot `index` on; batch is axis 0.

    index: a scalar (every row writes at the same slot, as `generate`'s batches do) or an int32
    [B] array (each row at its own slot, as the inference engine's slots do)."""
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        start = tuple(index if a == axis else 0 for a in range(cache.ndim))
        return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)

    def row(c, u, i):
        return jax.lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), i, axis=axis - 1)

    return jax.vmap(row)(cache, new, index)


def read_slots(cache: jax.Array, index, t: int, axis: int) -> jax.Array:
    """The T entries of `cache` on `axis` from slot `index` on (scalar, or [B] per row as in
    `write_slots`); batch is axis 0."""
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_slice_in_dim(cache, index, t, axis=axis)
    return jax.vmap(lambda c, i: jax.lax.dynamic_slice_in_dim(c, i, t, axis=axis - 1))(cache, index)


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
    return _swiglu(x_btd, w_gate_df.astype(dt), w_up_df.astype(dt), w_down_fd.astype(dt))


def _swiglu_forward(x, w_gate_df, w_up_df, w_down_fd):
    gate = jnp.einsum("...d,df->...f", x, w_gate_df)
    up = jnp.einsum("...d,df->...f", x, w_up_df)
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_fd), (gate, up)


@jax.custom_vjp
def _swiglu(x, w_gate_df, w_up_df, w_down_fd):
    return _swiglu_forward(x, w_gate_df, w_up_df, w_down_fd)[0]


def _swiglu_fwd(x, w_gate_df, w_up_df, w_down_fd):
    out, (gate, up) = _swiglu_forward(x, w_gate_df, w_up_df, w_down_fd)
    return out, (x, gate, up, w_gate_df, w_up_df, w_down_fd)


def _swiglu_bwd(residuals, d_out):
    """The backward written out: autodiff's version of it on XLA:CPU writes the gate's and the
    up projection's gradients transposed for the weight-gradient matmuls from inside their
    elementwise fusions, which took 1.6x this version's time at SmolLM2's shape (208 vs 127 ms a
    layer, batch 4 x 512, 2 cores; transformers eager: 115 ms)."""
    x, gate, up, w_gate_df, w_up_df, w_down_fd = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_h = jnp.einsum("...d,fd->...f", d_out, w_down_fd)
    d_up = d_h * silu
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))  # silu'(g) = sig(g) (1 + g (1 - sig(g)))
    rows = (-1, x.shape[-1])
    x_nd, h_nf = x.reshape(rows), (silu * up).reshape(-1, gate.shape[-1])
    d_gate_nf, d_up_nf = d_gate.reshape(h_nf.shape), d_up.reshape(h_nf.shape)
    return (jnp.einsum("...f,df->...d", d_gate, w_gate_df) + jnp.einsum("...f,df->...d", d_up, w_up_df),
            jnp.einsum("nd,nf->df", x_nd, d_gate_nf), jnp.einsum("nd,nf->df", x_nd, d_up_nf),
            jnp.einsum("nf,nd->fd", h_nf, d_out.reshape(-1, d_out.shape[-1])))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---------------------------------------------------------------------------------------------
# Remat



REMAT_POLICIES: dict[str, Callable | None] = {  # the names of distill.models.config.RematName
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
