"""The SwiGLU MLP of a LoRA student, with its backward written out.

Autodiff of the adapted MLP on XLA:CPU writes the gate's and the up projection's gradients
transposed from inside their elementwise fusions (what `distill.models.layers.swiglu`'s written
backward avoids for a full fine-tune); here the backward is written the same way, and gives the
frozen weights no gradient at all (None: no weight-gradient matmul exists), only the adapters
and the input. The forward is the autodiff path's ops in the same order:
y = x W + (x A) B * scale for each adapted projection (`distill.models.lora.Adapter`).

Dimension alphabet: as `distill.models.layers`, plus R the adapter rank.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models.lora import adapter_attr

MLP_TARGETS = ("gate", "up", "down")


def swiglu(module: nnx.Module, x_btd: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array,
           w_down_fd: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) with the module's gate / up / down adapters (those it has),
    in x's dtype; one layer's slice inside the scan."""
    dt = x_btd.dtype
    adapters, scales = {}, []
    for t in MLP_TARGETS:
        a = getattr(module, adapter_attr(t), None)
        adapters[t] = None if a is None else (a.lora_a[...].astype(dt), a.lora_b[...].astype(dt))
        scales.append(None if a is None else float(a.scale))
    return _swiglu(tuple(scales), x_btd, w_gate_df, w_up_df, w_down_fd, adapters)


def _project(x, w, ab, scale):
    """(x W + (x A) B * scale, x A or None)."""
    y = jnp.tensordot(x, w, axes=1)
    if ab is None:
        return y, None
    xa = jnp.tensordot(x, ab[0], axes=1)  # [..., R]
    return y + jnp.tensordot(xa, ab[1], axes=1) * jnp.asarray(scale, y.dtype), xa


def _forward(scales, x, w_gate, w_up, w_down, adapters):
    gate, xa_g = _project(x, w_gate, adapters["gate"], scales[0])
    up, xa_u = _project(x, w_up, adapters["up"], scales[1])
    h = jax.nn.silu(gate) * up
    out, ha_d = _project(h, w_down, adapters["down"], scales[2])
    return out, (gate, up, xa_g, xa_u, ha_d)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu(scales, x, w_gate, w_up, w_down, adapters):
    return _forward(scales, x, w_gate, w_up, w_down, adapters)[0]


def _swiglu_fwd(scales, x, w_gate, w_up, w_down, adapters):
    out, saved = _forward(scales, x, w_gate, w_up, w_down, adapters)
    return out, (x, saved, w_gate, w_up, w_down, adapters)


def _back(x, d_y, w, ab, xa, scale):
    """(d x through this projection, (d A, d B) or None); no gradient for W."""
    d_x = jnp.tensordot(d_y, w, axes=(-1, -1))
    if ab is None:
        return d_x, None
    a, b = ab
    rows = (-1, x.shape[-1])
    d_xa = jnp.tensordot(d_y, b, axes=(-1, -1)) * jnp.asarray(scale, d_y.dtype)  # [..., R]
    d_b = jnp.einsum("nr,no->ro", xa.reshape(-1, xa.shape[-1]),
                     d_y.reshape(-1, d_y.shape[-1])) * jnp.asarray(scale, d_y.dtype)
    d_a = jnp.einsum("ni,nr->ir", x.reshape(rows), d_xa.reshape(-1, d_xa.shape[-1]))
    return d_x + jnp.tensordot(d_xa, a, axes=(-1, -1)), (d_a, d_b)


def _swiglu_bwd(scales, residuals, d_out):
    x, (gate, up, xa_g, xa_u, ha_d), w_gate, w_up, w_down, adapters = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_h, g_down = _back(silu * up, d_out, w_down, adapters["down"], ha_d, scales[2])
    d_up = d_h * silu
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))  # silu'(g) = sig(g) (1 + g (1 - sig(g)))
    d_x_g, g_gate = _back(x, d_gate, w_gate, adapters["gate"], xa_g, scales[0])
    d_x_u, g_up = _back(x, d_up, w_up, adapters["up"], xa_u, scales[1])
    grads = {"gate": g_gate, "up": g_up, "down": g_down}
    return d_x_g + d_x_u, None, None, None, grads


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
