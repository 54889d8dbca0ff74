"""Context parallelism on 8 fake devices: ring and all-gather attention over the `context` axis
equal unsharded attention (forward and gradients) for packed rows with padding; the model uses
it whenever the mesh has a context axis. (The training step: tests/test_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.models.attention import AttentionSettings, MaskInfo, attention, blockwise_attention
from distill.models.families import load_model_config
from distill.parallel import make_mesh
from distill.pretrained import init_model


def _packed(b=2, t=64, n=4, kh=2, h=8):
    rng = np.random.RandomState(0)
    seg = np.ones((b, t), np.int32)
    seg[0, 10:40], seg[0, 50:] = 2, 0  # a document across chunk borders, then padding
    seg[1, 30:] = 3
    seg = jnp.asarray(seg)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    qkv = [jnp.asarray(rng.randn(b, t, heads, h), jnp.float32) for heads in (n, kh, kh)]
    return qkv, seg, slots


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize("shape", [{"context": 8}, {"data": 2, "context": 4},
                                   {"fsdp": 2, "context": 2, "tensor": 2}])
def test_context_parallel_attention_equals_unsharded(strategy, shape):
    (q, k, v), seg, slots = _packed()
    mask = MaskInfo(slots, slots, seg != 0, seg, seg)
    settings = AttentionSettings(context_parallel=strategy)
    weight = (seg != 0)[:, :, None, None].astype(jnp.float32)  # no loss on padding
    scale = q.shape[-1] ** -0.5

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weight)

    def reference(q, k, v):
        return blockwise_attention(q, k, v, mask, scale, block_q=16, block_k=16)

    def sharded(q, k, v):
        return attention(q, k, v, mask, scale, settings=settings)

    out_r, grads_r = reference(q, k, v), jax.grad(loss(reference), (0, 1, 2))(q, k, v)
    with jax.set_mesh(make_mesh(shape)):
        jaxpr = str(jax.make_jaxpr(sharded)(q, k, v))
        assert "shard_map" in jaxpr and ("ppermute" if strategy == "ring" else "all_gather") in jaxpr
        out = jax.jit(sharded)(q, k, v)
        grads = jax.jit(jax.grad(loss(sharded), (0, 1, 2)))(q, k, v)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(out_r)[real], atol=1e-5)
    for g, g_r, what in zip(grads, grads_r, "qkv", strict=True):
        assert np.abs(np.asarray(g_r)).max() > 0.1, what
        np.testing.assert_allclose(g, g_r, atol=1e-5, err_msg=f"d{what}")


def test_the_model_attends_context_parallel_on_a_mesh_with_a_context_axis():
    cfg = load_model_config("configs/students/tiny-qwen2.yaml")
    model = init_model(cfg, 0)
    tokens = jnp.zeros((2, 128), jnp.int32)
    for shape, expected in (({"fsdp": 2, "context": 4}, True), ({"fsdp": 8}, False)):
        with jax.set_mesh(make_mesh(shape)):
            jaxpr = str(jax.make_jaxpr(lambda t: model.hidden(t, None, jnp.ones_like(t)))(tokens))
        assert ("shard_map" in jaxpr) == expected, shape


def test_a_row_that_does_not_split_over_the_context_axis_is_an_error():
    (q, k, v), seg, slots = _packed(t=60)
    mask = MaskInfo(slots, slots, seg != 0, seg, seg)
    with jax.set_mesh(make_mesh({"context": 8})), pytest.raises(ValueError, match="context=8"):
        jax.jit(lambda q, k, v: attention(q, k, v, mask, 0.3))(q, k, v)
