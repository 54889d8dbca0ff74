"""The backward passes written by hand (custom VJPs, for speed) equal autodiff of the plain
forward written here: the SwiGLU MLP and dense attention. (The fused chunked loss is checked
against the unchunked loss in test_losses.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.models.attention import dot_product_attention
from distill.models.layers import swiglu


def _grads(fn, args, weight):
    """fn's output and the gradients of sum(sin(fn) * weight) for every argument."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)) * weight)  # noqa: E731
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, tuple(range(len(a))))(*a)))(*args)


def _assert_close(got, want, tol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        w = np.asarray(w, np.float32)
        assert np.abs(w).max() > 0.1  # there is something to compare
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=tol * np.abs(w).max(),
                                   rtol=0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_swiglu_gradients_equal_autodiff(dtype, tol):
    """Inputs of the compute dtype, float32 weights (cast inside, as the models do)."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 5, 16), dtype)
    w_gate, w_up = (jnp.asarray(0.3 * rng.randn(16, 24), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(0.3 * rng.randn(24, 16), jnp.float32)

    def plain(x, w_gate, w_up, w_down):
        gate = x @ w_gate.astype(x.dtype)
        return (jax.nn.silu(gate) * (x @ w_up.astype(x.dtype))) @ w_down.astype(x.dtype)

    weight = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
    args = (x, w_gate, w_up, w_down)
    _assert_close(_grads(swiglu, args, weight), _grads(plain, args, weight), tol)


def _attention_case(rng, dtype):
    """GQA 6 query heads on 2 kv heads; row 0 packs two documents then padding (segment 0, which
    sees no key: its queries average all values), row 1 is one causal document."""
    b, t, n, kh, h = 2, 11, 6, 2, 8
    seg = np.ones((b, t), np.int32)
    seg[0, 4:8], seg[0, 8:] = 2, 0
    causal = np.tril(np.ones((t, t), bool))
    mask = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] != 0)
    assert not mask[0, 8:].any() and mask[0, :8].any(-1).all()
    q = jnp.asarray(rng.randn(b, t, n, h), dtype)
    k = jnp.asarray(rng.randn(b, t, kh, h), dtype)
    v = jnp.asarray(rng.randn(b, t, kh, h), dtype)
    return q, k, v, jnp.asarray(mask)


def _plain_attention(q, k, v, mask, scale):
    b, t, n, h = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h)


@pytest.mark.parametrize("layout", ["bskh", "bksh"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_dense_attention_gradients_equal_autodiff(layout, dtype, tol):
    """Every query row weighs in the loss, the fully hidden ones too (no key gets a gradient
    from them), with k and v in either layout."""
    rng = np.random.RandomState(1)
    q, k, v, mask = _attention_case(rng, dtype)
    scale = q.shape[-1] ** -0.5
    weight = jnp.asarray(rng.randn(*q.shape), jnp.float32)
    to_layout = (lambda x: x) if layout == "bskh" else (lambda x: x.transpose(0, 2, 1, 3))

    def ours(q, k, v):
        return dot_product_attention(q, to_layout(k), to_layout(v), mask, scale, kv_layout=layout)

    def plain(q, k, v):
        return _plain_attention(q, k, v, mask, scale)

    got, want = _grads(ours, (q, k, v), weight), _grads(plain, (q, k, v), weight)
    _assert_close(got, want, tol)
