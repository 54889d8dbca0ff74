"""Blockwise (online-softmax) attention equals the dense path and needs far less memory; on a mesh
the residual stream is split along the sequence over the tensor axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.models.attention import (
    BLOCKWISE_MIN_TOKENS,
    AttentionCall,
    MaskInfo,
    attention_path,
    blockwise_attention,
    dot_product_attention,
)
from distill.models.families import load_model_config
from distill.parallel import make_mesh
from tests.random_models import TINY_MOE, TINY_QWEN2, packed_batch, random_model


def _case(name: str, rng: np.random.RandomState):
    """(q, k, v, MaskInfo) of one attention shape; T = 37 and S = 37 are no block multiples.

    causal: GQA group 1. packed: group 4, value heads narrower than query/key heads (as in MLA),
    three documents then padding (segment 0) in row 0, two in row 1. ragged: group 2, 5 new
    queries at the end of a 37-slot cache whose rows are left-padded (a batch of prompts).
    """
    t = s = 37
    n, kh, h, hv = {"causal": (2, 2, 8, 8), "packed": (8, 2, 12, 8), "ragged": (4, 2, 8, 6)}[name]
    slots = np.broadcast_to(np.arange(s, dtype=np.int32), (2, s))
    valid = np.ones((2, s), bool)
    q_slots, q_seg, k_seg = slots, None, None
    if name == "packed":
        seg = np.ones((2, s), np.int32)
        seg[0, 9:20], seg[0, 20:31], seg[0, 31:] = 2, 3, 0
        seg[1, 17:] = 2
        q_seg = k_seg = jnp.asarray(seg)
        valid = seg != 0
    if name == "ragged":
        t = 5
        q_slots = slots[:, s - t:]
        valid[0, :5] = valid[1, :11] = False
    mask = MaskInfo(jnp.asarray(q_slots), jnp.asarray(slots), jnp.asarray(valid), q_seg,
                           k_seg)
    q = jnp.asarray(rng.randn(2, t, n, h), jnp.float32)
    k = jnp.asarray(rng.randn(2, s, kh, h), jnp.float32)
    v = jnp.asarray(rng.randn(2, s, kh, hv), jnp.float32)
    return q, k, v, mask


@pytest.mark.parametrize("name", ["causal", "packed", "ragged"])
def test_blockwise_equals_dense_values_and_gradients(name):
    """GQA groups 1, 4 and 2, a value head size of its own (MLA), packed documents, left padding
    and offset queries; blocks of 8 x 16, so tiles are skipped, partial and padded."""
    q, k, v, mask = _case(name, np.random.RandomState(0))
    scale = q.shape[-1] ** -0.5
    sees_a_key = np.asarray(mask.dense().any(-1))  # [B, T]
    weight = jnp.asarray(sees_a_key, jnp.float32)[:, :, None, None]

    def dense(q, k, v):
        return dot_product_attention(q, k, v, mask.dense(), scale)

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, mask, scale, block_q=8, block_k=16)

    def out_and_grads(fn):  # queries that see nothing are padding: no loss there
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weight)  # noqa: E731
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)

    (out_d, grads_d), (out_b, grads_b) = out_and_grads(dense), out_and_grads(blockwise)
    assert out_b.shape == out_d.shape
    np.testing.assert_allclose(np.asarray(out_b)[sees_a_key], np.asarray(out_d)[sees_a_key],
                               atol=1e-5, rtol=0)
    assert not np.asarray(out_b)[~sees_a_key].any()  # a query that sees nothing gets zeros
    for g_b, g_d, what in zip(grads_b, grads_d, "qkv", strict=True):
        assert np.abs(np.asarray(g_d)).max() > 0.1, what  # the check has something to compare
        np.testing.assert_allclose(g_b, g_d, atol=1e-5, rtol=1e-5, err_msg=f"d{what}")


def _pair(model):
    """`model` with attention 'dense' and with 'blockwise': the same parameters, two configs."""
    out = []
    for attention in ("dense", "blockwise"):
        twin = nnx.merge(*nnx.split(model))
        twin.config = model.config.model_copy(update={"attention": attention})
        out.append(twin)
    return tuple(out)


@pytest.mark.parametrize("path,t", [(TINY_QWEN2, 600), (TINY_MOE, 80)])
def test_models_give_the_same_logits_with_blockwise_attention(path, t):
    """Dense (GQA) and MLA decoders: packed documents, T = 600 spans two 512-query blocks."""
    cfg = load_model_config(path)
    if path == TINY_MOE:  # MLA is what is tested: keep only the first, dense-MLP layer
        cfg = cfg.model_copy(update={"num_hidden_layers": 1})
    dense, blockwise = _pair(random_model(cfg))
    tokens, pos, seg = packed_batch(t, dense.config.vocab_size)
    run = nnx.jit(lambda m, *a: m(*a))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(run(blockwise, tokens, pos, seg))[real],
                               np.asarray(run(dense, tokens, pos, seg))[real], atol=1e-5, rtol=0)


def test_auto_attends_blockwise_from_2048_tokens_on_cpu():
    cfg = load_model_config(TINY_QWEN2)
    assert cfg.attention == "auto"

    def path(setting: str, t: int) -> str:
        call = AttentionCall(jnp.float32, t, t, cfg.head_size, cfg.head_size)
        return attention_path(setting, jax.default_backend(), call)[0]

    assert path(cfg.attention, BLOCKWISE_MIN_TOKENS) == "blockwise"
    assert path(cfg.attention, BLOCKWISE_MIN_TOKENS - 1) == "dense"
    assert path("blockwise", 8) == "blockwise" and path("dense", 1 << 16) == "dense"


def _temp_bytes(model, tokens_shape, mesh=None, train=True) -> int:
    """Compiled temporary bytes (per device) of a forward + backward of `model` (or `hidden`
    alone when not `train`)."""
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
        return jnp.mean(nnx.merge(graphdef, state)(tokens)[..., :8] ** 2)

    def hidden(state, tokens):
        return nnx.merge(graphdef, state).hidden(tokens)

    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32, sharding=sharding)
    compiled = jax.jit(jax.grad(loss) if train else hidden).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_blockwise_training_memory_is_far_below_dense(remat):
    """At T = 4096 the dense scores alone are 256 MiB per layer; blockwise keeps O(T) per layer
    (a probe of 70B at 32k tokens needed 208 GiB of temporaries per device without it), also
    when the layer scan rematerialises: once "full" and "dots" kept every tile's float32 scores
    (all T x S of them), hoisted out of the layer scan as loop invariants."""
    cfg = load_model_config(TINY_QWEN2, ["model.max_position_embeddings=4096",
                                         f"model.remat={remat}"])
    dense, blockwise = _pair(random_model(cfg))
    dense_bytes = _temp_bytes(dense, (1, 4096))
    blockwise_bytes = _temp_bytes(blockwise, (1, 4096))
    assert dense_bytes > 256 * 2**20
    assert blockwise_bytes < dense_bytes / 8, (blockwise_bytes, dense_bytes)


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "conftest should give JAX 8 CPU devices"
    return make_mesh({"data": 1, "fsdp": 2, "tensor": 4})


def test_residual_stream_is_split_along_the_sequence_on_a_mesh(mesh):
    cfg = load_model_config(TINY_QWEN2)
    plain, sharded = random_model(cfg), random_model(cfg, mesh)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 64)), jnp.int32)
    hidden = nnx.jit(lambda m, t: m.hidden(t))
    expected = hidden(plain, tokens)
    for model in _pair(sharded):
        with jax.set_mesh(mesh):
            got = hidden(model, tokens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
        # each device holds half the batch (fsdp = 2) and a quarter of the sequence (tensor = 4)
        assert got.addressable_shards[0].data.shape == (1, 16, cfg.hidden_size)
    # the forward's temporaries shrink; without `jax.set_mesh` the model adds no constraint
    unconstrained = _temp_bytes(sharded, (2, 256), mesh, train=False)
    with jax.set_mesh(mesh):
        split = _temp_bytes(sharded, (2, 256), mesh, train=False)
    assert split < 0.75 * unconstrained, (split, unconstrained)
