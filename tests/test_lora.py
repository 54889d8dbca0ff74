"""LoRA students against transformers + peft: a zero B leaves the base, PEFT adapters both ways,
the merged export against `merge_and_unload()`, and the QLoRA base's error bound."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import distill
from distill.errors import DistillError
from distill.models import lora, peft, quant
from distill.models.lora import LoraConfig
from tests.helpers import hf_logits, load, our_logits, save_hf, tiny_hf


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of SmolLM2-135M-Instruct (real weights), float32."""
    return distill.load_pretrained(smollm2_gguf)


def _ids(vocab, b=2, t=24, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (b, t))


def _adapted(model, cfg: LoraConfig, seed=0):
    """`model` with adapters of `cfg`, A and B drawn at random (B non-zero)."""
    lora.adapt(model, cfg, "none", jax.random.key(seed))
    rng = np.random.RandomState(seed)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype), state))
    return model


def _adapters(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_zero_b_is_the_base_bit_for_bit(tmp_path, family):
    model = load(save_hf(tiny_hf(family), tmp_path / "hf"))  # qwen2: random q/k/v biases
    ids = _ids(model.config.vocab_size)
    base = our_logits(model, ids)
    lora.adapt(model, LoraConfig(rank=8, alpha=16), "none", jax.random.key(0))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert len(flat) == 14 and all(np.any(v[...]) == (k[-1] == "lora_a") for k, v in flat.items())
    np.testing.assert_array_equal(our_logits(model, ids), base)


def _peft_parity(tmp_path, hf_dir, cfg: LoraConfig, ids, warned=None):
    """Our LoRA logits against transformers + PeftModel on our adapter directory, and our merged
    export against PEFT's merge_and_unload(), within 1e-4 in float32. Our base's logits and
    transformers' already differ by a float32 rounding gap (SmolLM2's 30 layers: 1.4e-4, which
    test_smollm2 allows up to 1e-3): the adapters may add at most 1e-4 to that gap."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load(hf_dir)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    base = our_logits(model, ids)
    gap = np.abs(base - hf_logits(ref, ids)).max()
    ours = our_logits(_adapted(model, cfg), ids)
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    out = peft.save_adapter(model, tmp_path / "adapter", str(hf_dir),
                            on_warning=None if warned is None else warned.append)
    # "error": a missing or unexpected adapter key raises instead of warning
    theirs = PeftModel.from_pretrained(ref, out, strict_adapter_check="error").eval()
    again = theirs.load_adapter(out, adapter_name="again")  # PEFT's own load result, checked
    assert not again.missing_keys and not again.unexpected_keys
    theirs.delete_adapter("again")
    np.testing.assert_allclose(ours, hf_logits(theirs, ids), atol=gap + 1e-4, rtol=0)
    merged_theirs = theirs.merge_and_unload()
    merged = distill.save_pretrained(lora.merge(model), None, tmp_path / "merged",
                                     dtype="float32")
    merged_ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    a, b = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-4, rtol=0, err_msg=k)
    np.testing.assert_allclose(hf_logits(merged_ours, ids), hf_logits(merged_theirs, ids),
                               atol=1e-4, rtol=0)
    return out


def test_qwen2_rslora_matches_peft_and_merge_and_unload(tmp_path):
    ref = tiny_hf("qwen2")
    cfg = LoraConfig(rank=8, alpha=16, rslora=True)
    _peft_parity(tmp_path, save_hf(ref, tmp_path / "hf"), cfg, _ids(ref.config.vocab_size))


def test_llama_target_subset_matches_peft_and_merge_and_unload(tmp_path):
    ref = tiny_hf("llama", tied=True)
    cfg = LoraConfig(rank=4, alpha=8, targets=("q", "v", "o", "down"))
    warned = []
    out = _peft_parity(tmp_path, save_hf(ref, tmp_path / "hf"), cfg,
                       _ids(ref.config.vocab_size), warned)
    written = json.loads((out / peft.CONFIG).read_text())
    assert written["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert written["r"] == 4 and written["lora_alpha"] == 8 and written["bias"] == "none"
    assert written["modules_to_save"] is None and written["use_rslora"] is False
    # rank 4 is not one of vLLM's --max-lora-rank values: exported, with a warning
    assert len(warned) == 1 and "--max-lora-rank 8" in warned[0]


@pytest.mark.slow  # 25-57 s on 2 busy cores: SmolLM2 loaded by us, saved, loaded twice by transformers
def test_smollm2_matches_peft_and_merge_and_unload(tmp_path, smollm2):
    start = time.monotonic()
    model, tok = smollm2
    hf_dir = distill.save_pretrained(model, tok, tmp_path / "smollm2", dtype="float32")
    ids = np.asarray([tok.encode("The sky is blue because")], np.int64)
    _peft_parity(tmp_path, hf_dir, LoraConfig(rank=8, alpha=16), ids)
    print(f"smollm2 peft parity: {time.monotonic() - start:.1f} s")


def test_an_adapter_peft_wrote_loads_into_ours(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    ref = tiny_hf("qwen2")
    hf_dir = save_hf(ref, tmp_path / "hf")
    ids = _ids(ref.config.vocab_size)
    base = our_logits(load(hf_dir), ids)
    base_gap = np.abs(base - hf_logits(ref, ids)).max()
    # init_lora_weights=False: PEFT draws B at random too (its testing initialisation)
    theirs = get_peft_model(ref, PeftLoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lora.adapt(load(hf_dir), LoraConfig(rank=8, alpha=16, targets=("q", "v", "down")),
                      "none", jax.random.key(0))
    peft.load_adapter(ours, tmp_path / "theirs")
    got = our_logits(ours, ids)
    assert np.abs(got - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, hf_logits(theirs, ids), atol=base_gap + 1e-4, rtol=0)


def test_adapter_export_import_is_bitwise(tmp_path):
    cfg = LoraConfig(rank=8, alpha=16, targets=("q", "k", "o", "gate", "down"))
    hf_dir = save_hf(tiny_hf("qwen2"), tmp_path / "hf")
    model = _adapted(load(hf_dir), cfg)
    out = peft.save_adapter(model, tmp_path / "adapter", "Qwen/base")
    tensors = load_file(out / peft.WEIGHTS)
    assert len(tensors) == 2 * len(cfg.targets) * model.config.num_hidden_layers
    a = tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
    assert a.dtype == b.dtype == np.float32
    assert a.shape == (8, 64) and b.shape == (64, 8)  # [R, in], [out, R]
    again = lora.adapt(load(hf_dir), cfg, "none", jax.random.key(7))
    peft.load_adapter(again, out)
    for x, y in zip(_adapters(model), _adapters(again), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert json.loads((out / peft.CONFIG).read_text())["base_model_name_or_path"] == "Qwen/base"


def test_qlora_adapters_export_and_load_on_the_unquantised_base(tmp_path):
    hf_dir = save_hf(tiny_hf("qwen2"), tmp_path / "hf")
    cfg = LoraConfig(rank=8, alpha=16)
    qlora = load(hf_dir)
    lora.adapt(qlora, cfg, "nf4", jax.random.key(0))
    _adapted(qlora, cfg)
    out = peft.save_adapter(qlora, tmp_path / "adapter", str(hf_dir))
    plain = lora.adapt(load(hf_dir), cfg, "none", jax.random.key(3))
    peft.load_adapter(plain, out)
    for x, y in zip(_adapters(qlora), _adapters(plain), strict=True):
        assert np.array_equal(x, y)


def test_merge_is_in_float32_cast_once(tmp_path):
    model, _ = distill.load_pretrained(save_hf(tiny_hf("llama"), tmp_path / "hf"),
                                       param_dtype="bfloat16")
    _adapted(model, LoraConfig(rank=8, alpha=16, targets=("o", "up")))
    w_o, w_up = model.blocks.attn.wo_nhd[...], model.blocks.mlp.w_up_df[...]
    expected_o = (w_o.astype(jnp.float32) + model.blocks.attn.o_lora.delta()).astype(jnp.bfloat16)
    expected_up = (w_up.astype(jnp.float32) + model.blocks.mlp.up_lora.delta()).astype(jnp.bfloat16)
    lora.merge(model)
    assert model.config.lora is None and model.blocks.attn.o_lora is None
    assert model.blocks.attn.wo_nhd.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.blocks.attn.wo_nhd[...]), np.asarray(expected_o))
    np.testing.assert_array_equal(np.asarray(model.blocks.mlp.w_up_df[...]),
                                  np.asarray(expected_up))


def test_adapter_export_on_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    import errno
    import os

    from distill.fsutil import WriteFailed

    cfg = LoraConfig(rank=8, alpha=16, targets=("q",))
    model = _adapted(load(save_hf(tiny_hf("llama"), tmp_path / "hf")), cfg)
    out = peft.save_adapter(model, tmp_path / "adapter", "base")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(peft.weights, "save_weights_file", full)
    with pytest.raises(WriteFailed) as e:
        peft.save_adapter(model, out, "base", overwrite=True)
    assert str(e.value).endswith(f"{out} is as it was; free space and rerun the same command")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "hf"]  # no temporaries


def test_bad_adapters_are_one_line(tmp_path):
    hf_dir = save_hf(tiny_hf("llama"), tmp_path / "hf")
    cfg = LoraConfig(rank=8, alpha=16, targets=("q", "v"))
    out = peft.save_adapter(_adapted(load(hf_dir), cfg), tmp_path / "adapter", "base")

    def refused(model, adapter_dir, *needles):
        with pytest.raises(DistillError) as e:
            peft.load_adapter(model, adapter_dir)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)

    fresh = lambda c: lora.adapt(load(hf_dir), c, "none", jax.random.key(1))  # noqa: E731
    refused(fresh(cfg.model_copy(update={"rank": 16})), out, "r is 8", "16")
    refused(fresh(cfg.model_copy(update={"targets": ("q", "k", "v")})), out, "target_modules")
    refused(load(hf_dir), out, "no LoRA adapters")
    refused(fresh(cfg), tmp_path / "hf", "no adapter_config.json")
    tensors = load_file(out / peft.WEIGHTS)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    save_file({**tensors, extra: np.zeros((8, 64), np.float32)}, str(out / peft.WEIGHTS))
    refused(fresh(cfg), out, "unexpected tensor", extra)
    save_file({k: v for k, v in tensors.items() if ".1." not in k}, str(out / peft.WEIGHTS))
    refused(fresh(cfg), out, "missing tensor", "layers.1.")


# ---------------------------------------------------------------------------------------------
# QLoRA: the quantised base


# bitsandbytes' NF4 table: bitsandbytes/functional.py, get_4bit_type("nf4") (the QLoRA paper's
# appendix E), copied here as published (bitsandbytes is not a dependency).
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_are_bitsandbytes_table():
    np.testing.assert_array_equal(quant.NF4_LEVELS, np.asarray(BNB_NF4, np.float32))


def _assert_within_bound(w: np.ndarray, fmt: str, what: str):
    """quantise -> dequantise stays within error_bound(fmt) x the block's absolute maximum."""
    q = quant.Quantized(jnp.asarray(w), (None,) * w.ndim, fmt)
    back = np.asarray(q.dequantise(jnp.float32))
    block = q.block
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], -1, block)
    absmax = np.repeat(np.abs(blocks).max(-1), block, axis=-1).reshape(w.shape)
    err = np.abs(back - w.astype(np.float32))
    # plus two float32 ulps of the block's maximum (the rounding of the dequantised value)
    assert np.all(err <= (quant.error_bound(fmt) + 2.0**-22) * absmax), \
        (what, fmt, float((err / np.maximum(absmax, 1e-30)).max()))
    assert back.shape == w.shape


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_dequantised_random_weights_within_bound(fmt):
    rng = np.random.RandomState(0)
    for shape in [(2, 64, 160), (3, 4, 16, 64), (2, 96, 40)]:  # 40: blocks of 8
        w = rng.standard_t(3, shape).astype(np.float32)  # heavy tails: blocks of unequal scale
        _assert_within_bound(w, fmt, str(shape))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_dequantised_smollm2_weights_within_bound(smollm2, fmt):
    model, _ = smollm2
    for t in lora.TARGETS.values():
        w = np.asarray(getattr(getattr(model.blocks, t.module), t.weight)[...])[:2]  # two layers: every shape
        _assert_within_bound(w, fmt, t.weight)


# ---------------------------------------------------------------------------------------------
# distill export --adapter


def test_export_adapter_writes_peft_dir_tokenizer_and_readme(tmp_path, tok):
    from distill.export import export_adapter

    model = _adapted(load(save_hf(tiny_hf("llama"), tmp_path / "hf")), LoraConfig(rank=8))
    out = export_adapter(model, tok, tmp_path / "run-adapter", base_name="org/base",
                         source="students/run")
    names = {p.name for p in out.iterdir()}
    assert {peft.CONFIG, peft.WEIGHTS, "README.md", "tokenizer.json"} <= names
    readme = (out / "README.md").read_text()
    assert "base_model: org/base" in readme and "--max-lora-rank 8" in readme
    with pytest.raises(DistillError, match="already exists"):
        export_adapter(model, tok, out, base_name="org/base", source="students/run")


def test_export_adapter_of_what_is_not_a_lora_run_is_one_line(tmp_path):
    from tests.helpers import assert_user_error, invoke_cli

    hf_dir = save_hf(tiny_hf("llama"), tmp_path / "hf")
    out = tmp_path / "out"
    assert_user_error(invoke_cli(["export", hf_dir, "--out", out, "--adapter"]),
                      "--adapter", "a LoRA run", "a model directory, not a run")
    run = tmp_path / "run"  # a full fine-tune run: student.lora unset
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.json").write_text("{}")
    (run / "config.yaml").write_text(f"student:\n  init: {hf_dir}\n")
    assert_user_error(invoke_cli(["export", run, "--out", out, "--adapter"]),
                      "a full fine-tune run")
    assert not out.exists()
