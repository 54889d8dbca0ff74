"""The LoRA MLP's written-out backward equals autodiff of its plain formula (the output, the
input's and the adapters' gradients), with every MLP target and with a subset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.models import lora_mlp

D, F, R = 8, 12, 4


class _Adapter:  # what lora_mlp reads of an adapter: lora_a, lora_b, scale
    def __init__(self, key, n_in, n_out, scale):
        ka, kb = jax.random.split(key)
        self.lora_a = jax.random.normal(ka, (n_in, R))
        self.lora_b = jax.random.normal(kb, (R, n_out))
        self.scale = scale


class _Module:
    pass


def _reference(x, wg, wu, wd, ad, scales):
    def proj(v, w, ab, s):
        y = v @ w
        return y if ab is None else y + (v @ ab[0]) @ ab[1] * s
    h = jax.nn.silu(proj(x, wg, ad["gate"], scales[0])) * proj(x, wu, ad["up"], scales[1])
    return proj(h, wd, ad["down"], scales[2])


@pytest.mark.parametrize("targets", [("gate", "up", "down"), ("gate", "down")])
def test_written_backward_equals_autodiff(targets):
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (2, 3, D))
    wg, wu = jax.random.normal(keys[1], (D, F)), jax.random.normal(keys[2], (D, F))
    wd = jax.random.normal(keys[3], (F, D))
    module = _Module()
    dims = {"gate": (D, F), "up": (D, F), "down": (F, D)}
    for i, t in enumerate(("gate", "up", "down")):
        a = _Adapter(keys[4 + i], *dims[t], 0.5 + i) if t in targets else None
        setattr(module, f"{t}_lora", a)
    ad = {t: None if getattr(module, f"{t}_lora") is None else
          (getattr(module, f"{t}_lora").lora_a, getattr(module, f"{t}_lora").lora_b)
          for t in ("gate", "up", "down")}
    scales = [0.5, 1.5, 2.5]
    d_out = jax.random.normal(keys[7], (2, 3, D))

    def ours(x, ad):
        for t, ab in ad.items():
            if ab is not None:
                getattr(module, f"{t}_lora").lora_a, getattr(module, f"{t}_lora").lora_b = ab
        return jnp.sum(lora_mlp.swiglu(module, x, wg, wu, wd) * d_out)

    def theirs(x, ad):
        return jnp.sum(_reference(x, wg, wu, wd, ad, scales) * d_out)

    np.testing.assert_allclose(ours(x, ad), theirs(x, ad), rtol=1e-6)
    g_ours, g_ref = jax.grad(ours, (0, 1))(x, ad), jax.grad(theirs, (0, 1))(x, ad)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
