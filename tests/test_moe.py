"""DeepSeek-V3 teacher against transformers: logits, checkpoint layouts (FP8, fused experts, MTP),
expert parallelism, greedy generation, the R1 preset's size, and one-line errors on bad input."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import distill
from distill.errors import DistillError
from distill.inference import Engine, EngineConfig
from distill.models import safetensors_io, weights
from distill.models.families import abstract_model, load_model_config, param_count
from distill.parallel import make_mesh
from distill.sampling import SamplingParams
from tests.helpers import hf_greedy, hf_logits, our_logits, save_hf, staggered

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}

VARIANTS = {
    # query LoRA, 4 groups keep 2, one dense layer then two MoE layers, YaRN with mscale_all_dim
    "qlora-groups-yarn": dict(first_k_dense_replace=1, rope_scaling=YARN),
    # no query LoRA, every layer MoE, one group, unnormalised weights, q/kv/o biases, tied head
    "plain-q-all-moe": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1,
                            norm_topk_prob=False, attention_bias=True, tie_word_embeddings=True),
    # two dense layers, 2 groups keep 1, half-split rope (rope_interleave false), plain YaRN
    "two-dense-half-split": dict(first_k_dense_replace=2, n_group=2, topk_group=1,
                                 rope_interleave=False,
                                 rope_scaling={**YARN, "mscale": None, "mscale_all_dim": None}),
}


def tiny_deepseek(seed=0, **overrides):
    """A random float32 transformers DeepseekV3ForCausalLM whose routing really depends on x."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24,
              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
              topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
              initializer_range=0.1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    if kw.get("rope_scaling"):
        kw["rope_scaling"] = {k: v for k, v in kw["rope_scaling"].items() if v is not None}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif name.endswith("mlp.gate.weight"):  # router logits of order 1, not ~0
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def _ids(vocab, b=2, t=48, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (b, t))  # 48 > YaRN's original 32


def _with(model, **update):
    """The same weights under a config with some runtime fields changed."""
    cfg = model.config.model_copy(update=update)
    return nnx.merge(nnx.graphdef(abstract_model(cfg)), nnx.state(model))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The first variant: transformers model, its checkpoint directory and our model."""
    ref = tiny_deepseek(**VARIANTS["qlora-groups-yarn"])
    src = save_hf(ref, tmp_path_factory.mktemp("moe") / "hf")
    model, _ = distill.load_pretrained(src)
    return ref, src, model


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path, name, base):
    if name == "qlora-groups-yarn":
        ref, _, model = base
    else:
        ref = tiny_deepseek(**VARIANTS[name])
        model, _ = distill.load_pretrained(save_hf(ref, tmp_path / "hf"))
    ids = _ids(ref.config.vocab_size)
    want = hf_logits(ref, ids)
    assert want.std() > 0.1  # logits big enough for a 1e-4 tolerance to mean something
    np.testing.assert_allclose(our_logits(model, ids), want, atol=1e-4, rtol=0)


def test_every_dispatch_path_matches_transformers(base):
    """Capacity with overflow rounds, ragged_dot, and the few-token gather path are all exact."""
    ref, _, model = base
    ids = _ids(ref.config.vocab_size, t=24)
    want = hf_logits(ref, ids)
    for update in ({"moe_dispatch": "capacity", "moe_capacity_factor": 0.25},
                   {"moe_dispatch": "ragged"}):
        np.testing.assert_allclose(our_logits(_with(model, **update), ids), want, atol=1e-4, rtol=0)
    one = ids[:1, :1]  # 1 token x top-3 < 8 experts: only the chosen experts' weights are read
    np.testing.assert_allclose(our_logits(model, one), hf_logits(ref, one), atol=1e-4, rtol=0)


@pytest.mark.parametrize("capacity_factor", [2.0, 0.25])
def test_capacity_dispatch_gradient_equals_ragged_dot(capacity_factor):
    """The capacity rounds' custom VJP (one round, and overflow rounds under a skewed routing)
    gives the gradients that differentiating jax.lax.ragged_dot gives, for every input."""
    from distill.models.deepseek.experts import routed_experts

    m, d, f, e, k = 96, 16, 8, 8, 2
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (m, d))
    idx = jax.random.categorical(keys[1], jnp.log(jnp.arange(1.0, e + 1)), shape=(m, k))  # skewed
    w = jax.random.uniform(keys[2], (m, k))
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    ws = [0.3 * jax.random.normal(kk, s) for kk, s in zip(keys[3:], shapes, strict=True)]

    def loss(dispatch):
        def fn(x, w, *ws):
            y = routed_experts(x, w, idx, *ws, dispatch=dispatch, capacity_factor=capacity_factor)
            return jnp.sum(jnp.sin(y))  # a cotangent that differs per element
        return jax.jit(jax.grad(fn, argnums=tuple(range(5))))

    got, want = loss("capacity")(x, w, *ws), loss("ragged")(x, w, *ws)
    for g, r in zip(got, want, strict=True):
        assert float(jnp.abs(r).max()) > 0.1
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_routing_depends_on_the_correction_bias(base):
    """The bias changes which experts are chosen (a test that would notice it being ignored)."""
    ref, _, model = base
    ids = _ids(ref.config.vocab_size, t=16)
    unbiased = nnx.clone(model)
    bias = unbiased.moe_blocks.mlp.router_bias_e
    bias.set_value(bias[...] * 0)
    assert np.abs(our_logits(unbiased, ids) - hf_logits(ref, ids)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts


def _tensors(src):
    return load_file(src / "model.safetensors")


def _write(directory, config: dict, tensors: dict):
    """A checkpoint directory from a config dict and {name: array} (any dtype, FP8 included)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    safetensors_io.write_file(directory / "model.safetensors", specs, lambda k: tensors[k])
    return directory


def _quantize(w, block=(128, 128)):
    """float32 [O, I] -> (e4m3 [O, I], float32 scale_inv [ceil(O/bo), ceil(I/bi)]), DeepSeek-style."""
    (o, i), (bo, bi) = w.shape, block
    so, si = math.ceil(o / bo), math.ceil(i / bi)
    padded = np.zeros((so * bo, si * bi), np.float32)
    padded[:o, :i] = w
    blocks = padded.reshape(so, bo, si, bi)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(so * bo, si * bi)[:o, :i]
    return q.astype(ml_dtypes.float8_e4m3fn), scale.astype(np.float32)


def _dequantize(q, scale, block=(128, 128)):
    full = np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[: q.shape[0], : q.shape[1]]
    return q.astype(np.float32) * full


def _is_linear(name, array):
    skip = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")
    return array.ndim == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def test_fp8_block_scaled_checkpoint_with_mtp_layer(tmp_path, base):
    """FP8 e4m3 + 128x128 weight_scale_inv loads as the dequantized model; the MTP layer is skipped."""
    from transformers import AutoModelForCausalLM

    ref, src, _ = base
    config = json.loads((src / "config.json").read_text())
    plain, fp8 = {}, {}
    for name, w in _tensors(src).items():
        if _is_linear(name, w):
            q, s = _quantize(w)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            plain[name] = _dequantize(q, s)
        elif "mlp.gate." in name:  # the router stays float32, the rest is bfloat16, as published
            fp8[name] = plain[name] = w
        else:
            fp8[name] = w.astype(ml_dtypes.bfloat16)
            plain[name] = fp8[name].astype(np.float32)
    assert fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)  # 160 rows
    mtp = "model.layers.3."  # num_hidden_layers = 3: DeepSeek's MTP layer comes next
    fp8[mtp + "eh_proj.weight"], fp8[mtp + "eh_proj.weight_scale_inv"] = _quantize(np.ones((64, 128)))
    fp8[mtp + "enorm.weight"] = np.ones(64, np.float32)
    fp8[mtp + "mlp.experts.0.up_proj.weight"] = np.ones((32, 64), np.float32)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [128, 128]}
    ours, _ = distill.load_pretrained(
        _write(tmp_path / "fp8", {**config, "quantization_config": quant}, fp8))
    reference = AutoModelForCausalLM.from_pretrained(
        _write(tmp_path / "dequantized", config, plain), dtype=torch.float32).eval()
    ids = _ids(ref.config.vocab_size, t=24)
    want = hf_logits(reference, ids)
    assert np.abs(want - hf_logits(ref, ids)).max() > 1e-3  # quantization really changed weights
    np.testing.assert_allclose(our_logits(ours, ids), want, atol=1e-4, rtol=0)


def test_fused_expert_tensors_load(tmp_path, base):
    """transformers 5's in-memory layout (experts.gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    ref, src, model = base
    fused = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    config = json.loads((src / "config.json").read_text())
    again, _ = distill.load_pretrained(_write(tmp_path / "fused", config, fused))
    ids = _ids(ref.config.vocab_size, t=16)
    np.testing.assert_array_equal(our_logits(again, ids), our_logits(model, ids))


# ---------------------------------------------------------------------------------------------
# Expert parallelism and generation


def test_experts_sharded_over_expert_and_tensor_axes(base, monkeypatch):
    ref, src, plain = base
    mesh = make_mesh({"expert": 4, "tensor": 2})
    # the loader hands the devices one checkpoint tensor at a time, never a stacked parameter
    sent = []
    device_put, write_slice = jax.device_put, weights._write_slice
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: sent.append(np.asarray(x).nbytes)
                        or device_put(x, *a, **k))
    monkeypatch.setattr(weights, "_write_slice", lambda sharding: lambda stacked, value, index: (
        sent.append(value.nbytes), write_slice(sharding)(stacked, value, index))[1])
    sharded, _ = distill.load_pretrained(src, mesh=mesh)
    monkeypatch.undo()
    largest = max(4 * int(np.prod(a.shape)) for _, a in safetensors_io.iter_checkpoint(src))  # f32
    assert len(sent) > 50 and max(sent) <= largest
    w = sharded.moe_blocks.mlp.w_gate_edf[...]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    assert w.addressable_shards[0].data.shape == (2, 2, 64, 16)  # [L, E/4, D, F/2]
    ids = _ids(ref.config.vocab_size, b=4, t=32, seed=1)
    np.testing.assert_allclose(our_logits(sharded, ids), our_logits(plain, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("unrolled", ["0", "1"])
def test_greedy_generate_matches_transformers(base, unrolled):
    """MLA-latent KV cache in slots: 4 requests on 2 slots arriving at different times (the later
    ones wait for a free slot), prompts written in chunks of 16 (21 = 16 + 5), up to 31 cached
    decode steps past YaRN's original 32 positions; with the layers scanned over the stacked
    weights and caches, and unrolled over per-layer copies."""
    ref, _, model = base
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 96, n).tolist() for n in (5, 21, 1, 40)]
    budgets = [32, 9, 16, 7]
    # two cache windows (16 and the whole cache): every window is one more program to compile
    engine = Engine(model, config=EngineConfig(slots=2, max_len=96, prefill_chunk=16,
                                               decode_steps=4, min_window=128,
                                               unroll=unrolled == "1"), eos_ids=[])
    outs = staggered(engine, prompts, budgets)
    cache = model.init_cache(2, 64)
    assert cache.moe.latent.shape == (2, 2, 64, 32) and cache.moe.k_rope.shape == (2, 2, 64, 16)
    assert [o.token_ids for o in outs] == [
        hf_greedy(ref, p, b) for p, b in zip(prompts, budgets, strict=True)]


def test_export_to_hf_loads_in_transformers(tmp_path, base):
    """`save_pretrained` of a DeepSeek-V3 model: transformers loads it as it is (same logits,
    same 32 greedy tokens), experts are one tensor each, and distill reads it back bit-exact."""
    from transformers import AutoModelForCausalLM

    from distill.pretrained import save_pretrained

    ref, _, model = base
    out = save_pretrained(model, None, tmp_path / "export", dtype="float32")
    names = set(load_file(str(next(out.glob("*.safetensors")))))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(ref.config.vocab_size, b=2, t=24, seed=5)
    np.testing.assert_allclose(hf_logits(theirs, ids), our_logits(model, ids), atol=1e-4, rtol=0)
    prompt = ids[0, :9].tolist()
    engine = Engine(model, config=EngineConfig(slots=1, max_len=64), eos_ids=[])
    [ours] = engine.generate([prompt], SamplingParams(max_new_tokens=32))
    with torch.no_grad():
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours.token_ids == want
    back, _ = distill.load_pretrained(out)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(back, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Presets


def _transformers_count(config_json: dict) -> int:
    """Parameters plus persistent buffers (e_score_correction_bias) of transformers' model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_json))
    return sum(t.numel() for t in model.state_dict().values())


def test_r1_preset_parameter_count():
    from distill.models.deepseek import hf as deepseek_hf

    cfg = load_model_config("configs/teachers/deepseek-r1.yaml")
    assert cfg == load_model_config("configs/teachers/deepseek-v3.yaml")
    ours = param_count(cfg)
    assert ours == _transformers_count(deepseek_hf.config_to_hf(cfg)) == 671_026_419_200


def test_tiny_preset_runs():
    model, _ = distill.load_pretrained("configs/teachers/tiny-moe.yaml")
    logits = our_logits(model, _ids(512, t=8))
    assert logits.shape == (2, 8, 512) and np.isfinite(logits).all()


@pytest.mark.parametrize("override, message", [
    ("model.topk_group=5", "topk_group"),
    ("model.n_group=3", "n_group"),
    ("model.num_experts_per_tok=9", "num_experts_per_tok"),
    ("model.moe_dispatch=dense", "model.moe_dispatch"),
])
def test_bad_moe_config_names_the_key(override, message):
    with pytest.raises(DistillError) as e:
        load_model_config("configs/teachers/tiny-moe.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Bad checkpoints


def _drop(t, name):
    t.pop(name)


def _reshape(t, name):
    t[name] = t[name][:, :-1]


def _extra_layer(t, _):
    t["model.layers.4.input_layernorm.weight"] = np.ones(64, np.float32)


FP8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
UP3 = "model.layers.2.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("edit, config, message", [
    (lambda t: _drop(t, UP3), {}, f"missing tensor {UP3!r}"),
    (lambda t: _reshape(t, KV_B), {}, f"tensor {KV_B!r} has shape (160, 31), expected (160, 32)"),
    (lambda t: _extra_layer(t, None), {}, "is beyond num_hidden_layers"),
    (None, {"quantization_config": {"quant_method": "awq"}}, "unsupported quantization_config"),
    (None, {"quantization_config": {**FP8, "fmt": "e5m2"}}, "fmt='e5m2'"),
    (lambda t: t.update({KV_B: _quantize(t[KV_B])[0]}), {"quantization_config": FP8},
     f"FP8 tensor {KV_B!r} has no weight_scale_inv"),
    (lambda t: t.update({KV_B: _quantize(t[KV_B])[0], KV_B + "_scale_inv": np.ones((2, 2), np.float32)}),
     {"quantization_config": FP8}, "expected (2, 1) for a (160, 32) weight in 128x128 blocks"),
], ids=["missing", "shape", "extra-layer", "awq", "e5m2", "no-scale", "scale-shape"])
def test_bad_checkpoints_fail_in_one_line(tmp_path, base, edit, config, message):
    _, src, _ = base
    tensors = _tensors(src)
    if edit is not None:
        edit(tensors)
    cfg = {**json.loads((src / "config.json").read_text()), "num_nextn_predict_layers": 0, **config}
    bad = _write(tmp_path / "bad", cfg, tensors)
    with pytest.raises(DistillError) as e:
        distill.load_pretrained(bad)
    assert message in str(e.value) and "\n" not in str(e.value)
    shutil.rmtree(bad)
