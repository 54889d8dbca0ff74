"""Dense students against transformers: logits, export, and bit-exact round trips."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import distill
from distill.models import safetensors_io
from tests.helpers import hf_logits, load, our_logits, save_hf, tiny_hf

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

VARIANTS = {
    "qwen2-untied-gqa2": dict(family="qwen2", heads=4, kv_heads=2),
    "qwen2-tied-gqa2": dict(family="qwen2", tied=True, heads=4, kv_heads=2),
    "qwen2-mha-gqa1": dict(family="qwen2", heads=4, kv_heads=4),
    "qwen2-gqa7": dict(family="qwen2", heads=14, kv_heads=2, hidden=112),
    "llama-untied": dict(family="llama"),
    "llama-tied": dict(family="llama", tied=True),
    "llama3-rope-untied": dict(family="llama", rope_scaling=LLAMA3),
    "llama3-rope-tied": dict(family="llama", rope_scaling=LLAMA3, tied=True),
}


def _ids(vocab, b=2, t=160, seed=0):
    # 160 tokens: past the llama3 rope's original context (64), so the scaling matters.
    return np.random.RandomState(seed).randint(0, vocab, (b, t))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name):
    ref = tiny_hf(**VARIANTS[name])
    model = load(save_hf(ref, tmp_path / "hf"))
    ids = _ids(ref.config.vocab_size)
    np.testing.assert_allclose(our_logits(model, ids), hf_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen2-untied-gqa2", "qwen2-tied-gqa2", "llama3-rope-untied"])
def test_export_reloads_in_transformers_bit_exact(tmp_path, name):
    from transformers import AutoModelForCausalLM

    ref = tiny_hf(**VARIANTS[name])
    src = save_hf(ref, tmp_path / "hf")
    model = load(src)
    out = distill.save_pretrained(model, None, tmp_path / "export", dtype="float32")
    # every tensor identical, name for name
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(ref)
    ids = _ids(ref.config.vocab_size, t=40)
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(ref, ids), atol=1e-5, rtol=0)
    # greedy generation: distill and transformers agree on 32 new tokens (no end-of-sequence stop)
    from distill.inference import Engine, EngineConfig
    from distill.sampling import SamplingParams

    prompt = [int(i) for i in ids[0, :12]]
    engine = Engine(model, config=EngineConfig(slots=1, max_len=44), eos_ids=[])
    [ours] = engine.generate([prompt], SamplingParams(max_new_tokens=32))
    back.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = back.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                               pad_token_id=0)
    assert ours.token_ids == theirs[0, len(prompt):].tolist()


def test_sharded_checkpoint_with_index_round_trips(tmp_path):
    ref = tiny_hf("llama")
    model = load(save_hf(ref, tmp_path / "hf"))
    out = distill.save_pretrained(model, None, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / safetensors_io.INDEX_NAME).is_file()
    again = load(out)
    ids = _ids(ref.config.vocab_size, t=24)
    np.testing.assert_array_equal(our_logits(again, ids), our_logits(model, ids))


def test_bfloat16_weights_load_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tiny_hf("qwen2").to(torch.bfloat16)
    src = save_hf(ref, tmp_path / "hf")
    model, _ = distill.load_pretrained(src, param_dtype="bfloat16")
    out = distill.save_pretrained(model, None, tmp_path / "export", dtype="bfloat16")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        assert np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)), k
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16


def test_compute_dtype_and_remat_policies(tmp_path):
    """bfloat16 compute over float32 weights stays close; every remat policy is exact."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from distill.models.llama.model import DenseDecoder

    src = save_hf(tiny_hf("llama", rope_scaling=LLAMA3), tmp_path / "hf")
    model = load(src)
    ids = _ids(model.config.vocab_size, t=48)
    ref = our_logits(model, ids)
    bf16, _ = distill.load_pretrained(src, param_dtype="float32", dtype="bfloat16")
    assert bf16.blocks.attn.wq_dnh[...].dtype == jnp.float32
    assert np.abs(our_logits(bf16, ids) - ref).max() < 0.1

    def loss(state, graphdef):
        logits = nnx.merge(graphdef, state)(jnp.asarray(ids))
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    graphdef, state = nnx.split(model)
    want = jax.grad(loss)(state, graphdef)
    for policy in ("full", "dots", "dots_no_batch"):
        remat = DenseDecoder(model.config.model_copy(update={"remat": policy}), nnx.Rngs(0))
        g, _ = nnx.split(remat)
        got = jax.grad(loss)(state, g)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
