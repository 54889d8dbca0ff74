"""GGUF import: config and weights match transformers' own GGUF loading of the same file.

Tiny GGUF files are written here the way llama.cpp's converter writes them (Q/K rows permuted for
its rotary layout, norms in F32, weights quantized), so each quantization type is checked both
against transformers and against the float weights it was made from.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from distill.errors import DistillError
from distill.models.gguf import gguf_tensor_names, iter_gguf_tensors, read_gguf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# D=256 so every row fills whole K-quant super-blocks (256 values); H=64, N=4, K=2, F=512.
DIMS = {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "ffn": 512, "vocab": 64}
# keys transformers sets that a config.json does not carry: file name, unk id, the GGUF load record
CONFIG_IGNORED = {"_name_or_path", "_model_name_or_path", "architectures", "unk_token_id",
                  "transformers_version", "dtype", "quantization_config"}  # fmt: skip
# largest relative RMS error of dequantized vs original weights, per type
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.12,
                   Q.Q4_1: 0.12, Q.Q4_K: 0.12, Q.Q6_K: 0.04}  # fmt: skip

HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


# --- writing GGUF files like llama.cpp ----------------------------------------------------------


def hf_weights(seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names and shapes."""
    rng = np.random.default_rng(seed)
    D, F, V = DIMS["hidden"], DIMS["ffn"], DIMS["vocab"]
    NH, KH = DIMS["heads"] * 64, DIMS["kv_heads"] * 64
    shapes = {
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (V, D),
    }
    layer = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
             "self_attn.q_proj.weight": (NH, D), "self_attn.k_proj.weight": (KH, D),
             "self_attn.v_proj.weight": (KH, D), "self_attn.o_proj.weight": (D, NH),
             "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
             "mlp.down_proj.weight": (D, F)}  # fmt: skip
    if bias:
        layer |= {"self_attn.q_proj.bias": (NH,), "self_attn.k_proj.bias": (KH,),
                  "self_attn.v_proj.bias": (KH,)}  # fmt: skip
    for i in range(DIMS["layers"]):
        shapes |= {f"model.layers.{i}.{leaf}": shape for leaf, shape in layer.items()}
    return {
        name: (0.02 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in shapes.items()
    }


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        return f"blk.{i}.{HF_TO_GGUF[module]}.{leaf}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]  # fmt: skip


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py) for Q/K rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path, weights, qtype=Q.F32, arch="llama", skip_meta=(), tensor_types=None, extra=None
):
    """Write ``weights`` (HF names) as llama.cpp would: renamed, Q/K permuted for llama, quantized.

    ``extra(writer)`` may add metadata.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    if extra is not None:
        extra(writer)
    meta = {"block_count": DIMS["layers"], "context_length": 512, "embedding_length": DIMS["hidden"],
            "feed_forward_length": DIMS["ffn"], "head_count": DIMS["heads"],
            "head_count_kv": DIMS["kv_heads"], "rope_freq_base": 500000.0,
            "layer_norm_rms_eps": 1e-5, "rope_dimension_count": 64, "vocab_size": DIMS["vocab"],
            "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    for key, value in meta.items():
        if key not in skip_meta:
            getattr(writer, f"add_{key}")(value)
    for name, w in weights.items():
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, DIMS["heads"])
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, DIMS["kv_heads"])
        kind = (tensor_types or {}).get(name, qtype if w.ndim == 2 else Q.F32)
        data = quantize(w, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if data.dtype != np.uint8 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """Bytes (or floats) for ``w`` in ``qtype``; gguf-py has no K-quant quantizer, so those are here."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(w)
    if qtype == Q.Q6_K:
        return quantize_q6_k(w)
    if qtype == Q.TQ1_0:  # a type distill does not read: content does not matter
        return np.zeros((*w.shape[:-1], w.shape[-1] // 256 * 54), np.uint8)
    return gguf.quants.quantize(w, qtype)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (an all-zero block)."""
    b = np.broadcast_to(b, a.shape)
    return np.divide(a, b, out=np.zeros(a.shape, np.float32), where=b != 0)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K: per 256 values, 8 sub-blocks of 32 with 6-bit scale and min; x = d*sc*q - dmin*m."""
    x = w.reshape(-1, 8, 32).astype(np.float32)
    offset = -np.minimum(x.min(-1), 0.0)  # [blocks, 8], >= 0
    step = (x.max(-1) + offset) / 15
    d, dmin = _f16(step.max(-1) / 63), _f16(offset.max(-1) / 63)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.ceil(_div(step, d32)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(_div(offset, dmin32)), 0, 63).astype(np.uint8)
    q = np.round(_div(x + (dmin32 * m)[..., None], (d32 * sc)[..., None]))
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(-1, 4, 2, 32)
    scales = np.concatenate(
        [sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
         (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4], axis=1)  # fmt: skip
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(*w.shape[:-1], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K: per 256 values, 16 int8 scales of 16 values and one f16 d; x = d*sc*(q-32)."""
    x = w.reshape(-1, 16, 16).astype(np.float32)
    step = np.abs(x).max(-1) / 31
    d = _f16(step.max(-1) / 127)
    d32 = d.astype(np.float32)
    sc = np.clip(np.ceil(_div(step, d32)), 0, 127).astype(np.int8)
    q = np.clip(np.round(_div(x, (d32 * sc)[..., None])), -32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, quarter, 32]
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, :2] | low[:, :, 2:] << 4).reshape(-1, 128)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(
        -1, 64
    )
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return blocks.reshape(*w.shape[:-1], -1)


# --- transformers' view of a file ---------------------------------------------------------------


def hf_load(path: Path):
    """transformers' model for a GGUF file (dequantized, float32)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )


def assert_config_matches(ours: dict, theirs) -> None:
    """Our config.json dict, loaded by transformers, equals the config it builds from the GGUF."""
    config_class = transformers.AutoConfig.for_model(ours["model_type"]).__class__
    a = {k: v for k, v in config_class(**ours).to_dict().items() if k not in CONFIG_IGNORED}
    b = {k: v for k, v in theirs.to_dict().items() if k not in CONFIG_IGNORED}
    assert a == b


def assert_tensors_match(path: Path, model) -> dict[str, np.ndarray]:
    """Every tensor we read equals transformers' parameter; returns ours."""
    state = model.state_dict()
    ours = dict(iter_gguf_tensors(path))
    expected = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(ours) == expected
    for name, array in ours.items():
        assert array.dtype == np.float32 and array.shape == tuple(state[name].shape), name
        np.testing.assert_allclose(array, state[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    return ours


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(the GGUF's path: conftest.py's smollm2_gguf, transformers' model of it)."""
    return smollm2_gguf, hf_load(smollm2_gguf)


def test_smollm2_config_matches_transformers(smollm2):
    path, model = smollm2
    ours = read_gguf_config(path)
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["tie_word_embeddings"] is True
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["head_dim"]) == (576, 30, 64)
    assert_config_matches(ours, model.config)


def test_smollm2_tensors_match_transformers(smollm2):
    path, model = smollm2
    ours = assert_tensors_match(path, model)
    assert "lm_head.weight" not in ours
    assert gguf_tensor_names(path) == list(ours)


# --- every quantization type, on tiny files -----------------------------------------------------


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quant_type_matches_transformers_and_original(tmp_path, qtype):
    weights = hf_weights()
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", weights, qtype)
    model = hf_load(path)
    assert_config_matches(read_gguf_config(path), model.config)
    ours = assert_tensors_match(path, model)
    for name, original in weights.items():  # includes un-permuted Q/K against the HF originals
        error = np.linalg.norm(ours[name] - original) / np.linalg.norm(original)
        assert error <= QUANT_TOLERANCE[qtype if original.ndim == 2 else Q.F32], (name, error)


def test_qwen2_with_biases_is_not_unpermuted(tmp_path):
    weights = hf_weights(seed=1, bias=True)
    path = write_gguf(tmp_path / "tiny-qwen2.gguf", weights, Q.F16, arch="qwen2")
    model = hf_load(path)
    config = read_gguf_config(path)
    assert (
        config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is False
    )
    assert_config_matches(config, model.config)
    ours = assert_tensors_match(path, model)
    q_bias = "model.layers.1.self_attn.q_proj.bias"
    np.testing.assert_array_equal(ours[q_bias], weights[q_bias])


def test_tensors_are_owned_and_cast(tmp_path):
    weights = hf_weights()
    path = write_gguf(tmp_path / "tiny.gguf", weights, Q.F32)
    assert gguf_tensor_names(path) == list(weights)
    tensors = dict(iter_gguf_tensors(path, dtype=np.float16))
    norm = tensors["model.norm.weight"]
    assert type(norm) is np.ndarray and norm.dtype == np.float16 and norm.flags.writeable
    np.testing.assert_array_equal(norm, weights["model.norm.weight"].astype(np.float16))
    norm[:] = 0  # a copy, not a view of the file: reading again gives the weights back
    again = dict(iter_gguf_tensors(path))["model.norm.weight"]
    np.testing.assert_array_equal(again, weights["model.norm.weight"])


def test_rope_scaling_is_read(tmp_path):
    def linear_x4(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(128)

    config = read_gguf_config(write_gguf(tmp_path / "scaled.gguf", hf_weights(), extra=linear_x4))
    scaling = {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 128}
    assert config["rope_scaling"] == scaling
    assert transformers.LlamaConfig(**config).rope_parameters["factor"] == 4.0


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", hf_weights(), Q.Q8_0)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01], ids=["data", "tensor-table", "header"])
def test_truncated_file(tiny, keep):
    data = tiny.read_bytes()
    tiny.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DistillError, match=rf"{tiny}: .*truncated"):
        list(iter_gguf_tensors(tiny))
    with pytest.raises(DistillError, match="truncated"):
        read_gguf_config(tiny)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all"], ids=["empty", "text"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(DistillError, match=f"{path}"):
        read_gguf_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(DistillError, match="cannot read GGUF file"):
        gguf_tensor_names(tmp_path / "nope.gguf")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", hf_weights(), arch="gpt2")
    for read in (read_gguf_config, gguf_tensor_names, iter_gguf_tensors):
        with pytest.raises(DistillError, match="architecture 'gpt2' is not supported"):
            read(path)


def test_unsupported_quant_type(tmp_path):
    types = {"model.layers.1.mlp.up_proj.weight": Q.TQ1_0}
    path = write_gguf(tmp_path / "tq.gguf", hf_weights(), tensor_types=types)
    with pytest.raises(DistillError, match=r"blk\.1\.ffn_up\.weight has quantization type TQ1_0"):
        iter_gguf_tensors(path)  # raised before anything is yielded


def test_missing_tensor(tmp_path):
    weights = hf_weights()
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_gguf(tmp_path / "missing.gguf", weights)
    with pytest.raises(DistillError, match=r"lacks tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        iter_gguf_tensors(path)


def test_missing_metadata(tmp_path):
    path = write_gguf(tmp_path / "nometa.gguf", hf_weights(), skip_meta={"embedding_length"})
    with pytest.raises(DistillError, match=r"lacks llama\.embedding_length"):
        read_gguf_config(path)
