"""The fused attention kernels equal the reference (blockwise) attention: the Pallas kernels run
in the Pallas interpreter on CPU (forward and gradients, packed rows with padding, causal, GQA,
several block sizes); the auto choice per platform, with the platform faked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.errors import DistillError
from distill.models.attention import AttentionCall, MaskInfo, attention_path, blockwise_attention
from distill.models.families import load_model_config
from distill.models.kernels import cudnn_attention, fused_attention
from tests.random_models import TINY_QWEN2, packed_batch, random_model


def _packed(t: int, n: int, kh: int, h: int, seed: int = 0):
    """q, k, v and segments of two packed rows: row 0 three documents then padding (segment 0),
    row 1 two documents; boundaries off the block grid."""
    rng = np.random.RandomState(seed)
    seg = np.ones((2, t), np.int32)
    seg[0, 10: t // 2 + 12], seg[0, t // 2 + 12: t - t // 5], seg[0, t - t // 5:] = 2, 3, 0
    seg[1, t // 2 + 2:] = 2
    q = jnp.asarray(rng.randn(2, t, n, h), jnp.float32)
    k = jnp.asarray(rng.randn(2, t, kh, h), jnp.float32)
    v = jnp.asarray(rng.randn(2, t, kh, h), jnp.float32)
    return q, k, v, jnp.asarray(seg)


def _reference_mask(seg):
    b, t = seg.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return MaskInfo(slots, slots, seg != 0, seg, seg)


def _out_and_grads(fn, q, k, v, real):
    weight = jnp.asarray(real, jnp.float32)[:, :, None, None]  # no loss on padding
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weight)  # noqa: E731
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("kernel,t,n,kh,h,block", [
    ("splash", 256, 4, 4, 32, 128),  # MHA, two query blocks
    ("splash", 256, 8, 2, 32, 256),  # GQA group 4, one block
    ("splash", 384, 4, 2, 64, 128),  # GQA group 2, three blocks
    ("pallas_gpu", 256, 4, 4, 32, 32),
    ("pallas_gpu", 256, 8, 2, 32, 64),
    ("pallas_gpu", 192, 4, 2, 16, 64),
])
def test_pallas_kernels_equal_reference_values_and_gradients(kernel, t, n, kh, h, block):
    q, k, v, seg = _packed(t, n, kh, h)
    real = np.asarray(seg) != 0
    scale = h ** -0.5
    mask = _reference_mask(seg)
    out_r, grads_r = _out_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, scale),
                                    q, k, v, real)
    out_k, grads_k = _out_and_grads(
        lambda q, k, v: fused_attention(kernel, q, k, v, seg, scale, block=block,
                                        interpret=True), q, k, v, real)
    assert out_k.shape == out_r.shape and out_k.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out_k)[real], np.asarray(out_r)[real], atol=2e-5)
    for g_k, g_r, what in zip(grads_k, grads_r, "qkv", strict=True):
        assert np.abs(np.asarray(g_r)).max() > 0.1, what  # the check has something to compare
        np.testing.assert_allclose(g_k, g_r, atol=2e-5, rtol=1e-5, err_msg=f"d{what}")


def test_cudnn_wrapper_layout_scale_and_grouping():
    """The cuDNN call itself needs a GPU; the same `jax.nn.dot_product_attention` call with
    implementation="xla" checks what the wrapper passes (layout, scale, GQA, causal)."""
    q, k, v, _ = _packed(64, 8, 2, 16)
    t = q.shape[1]
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    ref = blockwise_attention(q, k, v, MaskInfo(slots, slots, jnp.ones((2, t), bool)), 0.3)
    np.testing.assert_allclose(cudnn_attention(q, k, v, 0.3, implementation="xla"), ref,
                               atol=2e-6)


BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize("setting,platform,dtype,t,h,hv,packed,expected", [
    ("auto", "tpu", BF16, 8192, 128, 128, True, "splash"),
    ("auto", "tpu", BF16, 8000, 128, 128, True, "blockwise"),  # not a multiple of 128
    ("auto", "tpu", BF16, 8192, 192, 128, True, "blockwise"),  # MLA: value heads narrower
    ("auto", "gpu", BF16, 8192, 128, 128, False, "cudnn"),
    ("auto", "gpu", BF16, 8192, 128, 128, True, "pallas_gpu"),  # packed rows
    ("auto", "gpu", F32, 8192, 128, 128, False, "pallas_gpu"),  # cuDNN takes 16-bit only
    ("auto", "gpu", BF16, 8192, 96, 96, True, "blockwise"),  # no power-of-two head
    ("auto", "cpu", F32, 8192, 128, 128, True, "blockwise"),
    ("auto", "cpu", F32, 2047, 128, 128, True, "dense"),  # short rows on CPU
    ("dense", "tpu", BF16, 8192, 128, 128, True, "dense"),  # dense means dense
    ("blockwise", "tpu", BF16, 8192, 128, 128, True, "blockwise"),
    ("splash", "tpu", BF16, 8192, 128, 128, True, "splash"),
    ("splash", "cpu", F32, 256, 64, 64, True, "splash+interpret"),
    ("pallas_gpu", "cpu", F32, 256, 64, 64, True, "pallas_gpu+interpret"),
    ("cudnn", "gpu", BF16, 4096, 128, 128, False, "cudnn"),
])
def test_auto_choice_per_platform(setting, platform, dtype, t, h, hv, packed, expected):
    path, why = attention_path(setting, platform, AttentionCall(dtype, t, t, h, hv, packed))
    assert path == expected, why
    if expected == "blockwise" and setting == "auto" and platform != "cpu":
        assert "not " in why  # says which kernel was ruled out, and why


@pytest.mark.parametrize("setting", ["auto", "dense", "blockwise", "splash"])
def test_a_cache_step_is_dense_and_a_context_axis_is_context_parallel(setting):
    """The two rules above every setting: the KV-cache step reads the cache once (dense), and a
    mesh with a `context` axis attends context parallel."""
    call = AttentionCall(F32, 1, 4096, 64, 64, cached=True)
    assert attention_path(setting, "tpu", call)[0] == "dense"
    call = AttentionCall(F32, 4096, 4096, 64, 64, context=4)
    assert attention_path(setting, "tpu", call) == ("context", "context=4")


def test_every_attention_setting_is_one_registry():
    """The config field takes exactly the registry's names, and every kernel is one of them."""
    import typing

    from distill.models.config import AttentionName, ContextParallelName
    from distill.models.kernels import KERNELS
    from distill.models.settings import ATTENTION, CONTEXT_PARALLEL

    assert typing.get_args(AttentionName) == tuple(ATTENTION)
    assert typing.get_args(ContextParallelName) == tuple(CONTEXT_PARALLEL)
    assert set(KERNELS) <= set(ATTENTION)
    for setting in ATTENTION:  # each one resolves to a path (cuDNN on a GPU, the rest on CPU)
        platform = "gpu" if setting == "cudnn" else "cpu"
        assert attention_path(setting, platform, AttentionCall(BF16, 256, 256, 64, 64))[0]


@pytest.mark.parametrize("setting,platform,dtype,packed,message", [
    ("cudnn", "cpu", BF16, True, "needs a gpu"),
    ("cudnn", "gpu", BF16, True, "packed rows"),
    ("splash", "tpu", BF16, True, "multiple of 128"),
    ("splash", "gpu", BF16, True, "needs a tpu"),  # interpreted on CPU only, never on a GPU
])
def test_a_kernel_named_explicitly_must_apply(setting, platform, dtype, packed, message):
    t = 200 if setting == "splash" else 256
    with pytest.raises(DistillError, match=message):
        attention_path(setting, platform, AttentionCall(dtype, t, t, 64, 64, packed))


@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_a_model_with_a_kernel_gives_the_dense_logits(kernel):
    """The whole student (packed documents, restarting positions) with `attention: <kernel>`:
    the config field reaches every layer, interpreted on CPU."""
    cfg = load_model_config(TINY_QWEN2)
    # the same weights twice (drawn from one seed), two settings
    dense = random_model(cfg.model_copy(update={"attention": "dense"}))
    fused = random_model(cfg.model_copy(update={"attention": kernel}))
    tokens, pos, seg = packed_batch(256, cfg.vocab_size)
    real = np.asarray(seg) != 0
    ref = np.asarray(jax.jit(lambda *a: dense(*a))(tokens, pos, seg))[real]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: fused(*a))(tokens, pos, seg))[real],
                               ref, atol=2e-5)


def test_a_step_with_bfloat16_parameters_keeps_the_state_dtypes():
    """bfloat16 parameters and optimizer state (the 7B device case): the step hands back the
    state in the dtypes it took (gradients are divided by a float32 token count)."""
    import optax

    from distill.train.config import LossConfig
    from distill.train.losses import make_loss_fn
    from distill.train.step import init_state, make_step

    cfg = load_model_config(TINY_QWEN2).model_copy(update={"param_dtype": "bfloat16",
                                                          "dtype": "bfloat16"})
    model = random_model(cfg)
    tx = optax.adamw(1e-3)
    graphdef, state, frozen = init_state(model, tx)
    tokens, pos, seg = packed_batch(64, cfg.vocab_size)
    batch = {"tokens_bt": tokens, "targets_bt": tokens, "loss_mask_bt": seg != 0,
             "segment_ids_bt": seg, "positions_bt": pos}
    new, _ = jax.jit(make_step(graphdef, tx, make_loss_fn(LossConfig()), lambda s: 1e-3))(
        state, batch, frozen)
    before = [x.dtype for x in jax.tree.leaves(state)]
    assert [x.dtype for x in jax.tree.leaves(new)] == before
    assert jnp.dtype(jnp.bfloat16) in before


def test_tiles_are_powers_of_two_that_divide_the_row():
    from distill.models.kernels import _tile

    for t, block, smallest, expected in [(384, 512, 128, 128), (8192, 512, 128, 512),
                                         (192, 512, 16, 64), (256, 64, 16, 64), (48, 512, 16, 16)]:
        assert _tile(t, block, smallest) == expected, (t, block)
