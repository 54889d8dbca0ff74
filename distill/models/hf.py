"""Hugging Face <-> native: the config.json mapping and one declarative weight table per family.

A table row is (HF name, native path, layout). `{i}` marks a per-layer tensor that lands in slice
i of a parameter stacked on L (`{e}`, an expert's, in slice [i, e]; `WeightTable` has the details,
and `distill.models.hf_moe` the DeepSeek-V3 table). `build_from_tensors` takes any table and model
class. Layouts:
  "same"  the same array (embeddings, norms);
  "flat"  HF keeps the named dims flattened (q/k/v biases: [N*H] <-> [N, H]);
  "t1"/"t2"  a linear layer: HF stores W as [out, in]; the native parameter is W transposed and
          split into named dims, of which the first 1 or 2 (after L) make HF's input axis:
          native = W.T.reshape(native_shape), W = native.reshape(in, out).T.
Nothing else happens to a tensor, so HF -> distill -> HF is bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distill.config import DenseConfig, MoEConfig, RopeScaling, validate
from distill.errors import DistillError
from distill.models import safetensors_io
from distill.models.dense import DenseDecoder
from distill.models.moe import MoEDecoder
from distill.parallel import variable_sharding

Row = tuple[str, str, str]

DENSE_TABLE: tuple[Row, ...] = (
    ("model.embed_tokens.weight", "embed.embedding_vd", "same"),
    ("model.norm.weight", "final_norm_d", "same"),
    ("lm_head.weight", "lm_head_dv", "t1"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.attn_norm_d", "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.mlp_norm_d", "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.attn.wq_dnh", "t1"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.attn.wk_dkh", "t1"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.attn.wv_dkh", "t1"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.attn.wo_nhd", "t2"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blocks.attn.bq_nh", "flat"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blocks.attn.bk_kh", "flat"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blocks.attn.bv_kh", "flat"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.mlp.w_gate_df", "t1"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.mlp.w_up_df", "t1"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.mlp.w_down_fd", "t1"),
)
# Buffers that some checkpoints carry and that hold no learned weight.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, source: str = "config.json", **runtime) -> DenseConfig:
    """Map a config.json dict to a DenseConfig (runtime fields such as param_dtype via kwargs)."""
    arch = (hf.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) or {"llama": "llama", "qwen2": "qwen2"}.get(hf.get("model_type"))
    if family is None:
        raise DistillError(
            f"{source}: unsupported architecture {arch or hf.get('model_type')!r} "
            f"(supported: {', '.join(ARCHITECTURES)})")
    if hf.get("mlp_bias"):
        raise DistillError(f"{source}: mlp_bias=true is not supported")
    theta, scaling = rope_from_hf(hf)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "sliding_window",
            "use_sliding_window", "max_window_layers")
    data = {k: hf[k] for k in keys if hf.get(k) is not None}
    data["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if isinstance(data.get("eos_token_id"), list):
        data["eos_token_id"] = tuple(data["eos_token_id"])
    data.update(family=family, rope_theta=theta, rope_scaling=scaling,
                attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)))
    data.update(runtime)

    try:
        return validate(DenseConfig, data, source)
    except KeyError as e:
        raise DistillError(f"{source}: missing key {e.args[0]!r}") from None


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from config.json, old or transformers >= 5 style."""
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests theta and scaling here
    theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope or None
    if scaling:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
        known = set(RopeScaling.model_fields)
        scaling = {k: v for k, v in scaling.items() if k in known}
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


def config_to_hf(cfg: DenseConfig, torch_dtype: str | None = None) -> dict:
    """A config.json dict that transformers loads as the same architecture."""
    out = {
        "architectures": [FAMILY_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.as_hf() if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "torch_dtype": torch_dtype or cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    if cfg.family == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=cfg.use_sliding_window,
                   max_window_layers=cfg.max_window_layers or cfg.num_hidden_layers)
    return out


# ---------------------------------------------------------------------------------------------
# Weights


@dataclasses.dataclass(frozen=True)
class WeightTable:
    """One family's HF <-> native weight mapping.

    rows: (HF name, native path, layout). An HF name may hold `{i}` (decoder layer) and `{e}`
    (expert); each placeholder present indexes one leading axis of the native parameter, in that
    order. A native path starting with `{stack}.` stands for every (module, first HF layer) pair in
    `stacks`: HF layer i lands in the stack that holds it, at slice i - first.
    optional: native paths a config may leave out, whose tensors are then skipped (a tied head).
    ignored: tensor names that carry no learned weight.
    """

    rows: tuple[Row, ...]
    stacks: tuple[tuple[str, int], ...] = ()
    optional: tuple[str, ...] = ("lm_head_dv",)
    ignored: re.Pattern = IGNORED


DENSE = WeightTable(DENSE_TABLE)
_PLACEHOLDERS = ("i", "e")  # decoder layer, expert: the leading native axes, in this order


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A table row compiled for one stack."""

    pattern: re.Pattern
    hf: str
    key: tuple[str, ...]
    layout: str
    first: int  # HF index of the stack's first layer
    axes: tuple[str, ...]  # placeholders present, in native axis order

    def hf_name(self, index: tuple[int, ...]) -> str:
        name = self.hf
        for axis, j in zip(self.axes, index, strict=True):
            name = name.replace("{" + axis + "}", str(j + (self.first if axis == "i" else 0)))
        return name


def _compile_table(table: WeightTable) -> list[_Entry]:
    entries = []
    for hf, path, layout in table.rows:
        regex = re.escape(hf)
        for p in _PLACEHOLDERS:
            regex = regex.replace(re.escape("{" + p + "}"), f"(?P<{p}>\\d+)")
        axes = tuple(p for p in _PLACEHOLDERS if "{" + p + "}" in hf)
        stacks = table.stacks if path.startswith("{stack}.") else ((None, 0),)
        for stack, first in stacks:
            native = path.replace("{stack}", stack) if stack else path
            entries.append(_Entry(re.compile(f"^{regex}$"), hf, _path_key(native), layout,
                                  first, axes))
    return entries


def _path_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def hf_to_native(w: np.ndarray, native_shape: tuple[int, ...], layout: str) -> np.ndarray:
    """HF tensor -> native layout (one layer's slice)."""
    return (w.T if layout.startswith("t") else w).reshape(native_shape)


def native_to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    """Native slice -> HF tensor ([out, in] for linears)."""
    if layout == "same":
        return x
    if layout == "flat":
        return x.reshape(-1)
    return x.reshape(math.prod(x.shape[: int(layout[1:])]), -1).T


def model_class(cfg) -> type[nnx.Module]:
    """The decoder class a config describes (dense student or MoE teacher)."""
    if isinstance(cfg, MoEConfig):
        return MoEDecoder
    return DenseDecoder


def abstract_model(cfg, model_cls: type[nnx.Module] | None = None) -> nnx.Module:
    """The model with ShapeDtypeStructs in place of arrays (no allocation)."""
    model_cls = model_cls or model_class(cfg)
    return nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0)))


def param_count(cfg) -> int:
    """Number of parameters of the model a config describes (from shapes only)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))


def build_from_tensors(cfg, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                       mesh: Mesh | None = None, *, table: WeightTable = DENSE,
                       model_cls: type[nnx.Module] | None = None) -> nnx.Module:
    """Assemble a model from (HF name, array) pairs streamed one at a time, as `table` says.

    Each tensor goes to the device (sharded as the parameter's logical names say when `mesh` is
    given) as soon as it arrives: a stacked parameter is allocated on the device(s) first and
    every layer's (or expert's) slice is written into it in place. Host memory therefore holds one
    tensor at a time, not a stacked parameter (DeepSeek-V3's routed experts are 58 x 256 x 7168 x
    2048 per projection, 436 GB in bfloat16).
    """
    graphdef, state = nnx.split(abstract_model(cfg, model_cls))
    abstract = dict(nnx.to_flat_state(state))
    entries = _compile_table(table)
    stacked: dict[tuple, jax.Array] = {}
    pending: dict[tuple, set[tuple[int, ...]]] = {}
    done: dict[tuple, jax.Array] = {}
    for name, array in tensors:
        ent, index = _locate(name, entries, abstract, table, source)
        if ent is None:
            continue
        var = abstract[ent.key]
        n = len(index)
        todo = pending.setdefault(ent.key, _all_slices(var.shape[:n]))
        if index not in todo:
            raise DistillError(f"{source}: tensor {name!r} appears twice")
        shape = var.shape[n:]
        expect = native_to_hf(np.empty(shape, np.uint8), ent.layout).shape
        if tuple(array.shape) != tuple(expect):
            raise DistillError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                               f"expected {tuple(expect)} for this config")
        value = hf_to_native(np.asarray(array), shape, ent.layout).astype(var.dtype)
        todo.discard(index)
        sharding = variable_sharding(var, mesh) if mesh is not None else None
        if not n:
            done[ent.key] = jax.device_put(value, sharding)
            continue
        if ent.key not in stacked:
            # made where it lives (each device its shard), never as one host buffer
            stacked[ent.key] = jnp.zeros(var.shape, var.dtype, device=sharding)
        stacked[ent.key] = _write_slice(sharding)(stacked[ent.key], value, index)
        if not todo:
            done[ent.key] = stacked.pop(ent.key)
    missing = [k for k in abstract if k not in done]
    if missing:
        raise DistillError(f"{source}: missing tensor {_missing_name(missing[0], entries, abstract, pending)!r}"
                           + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, var in abstract.items():
        var.set_value(done[key])
    return nnx.merge(graphdef, nnx.from_flat_state(abstract))


@functools.cache
def _write_slice(sharding):
    """stacked[index] = value, in place (the stacked array is donated); compiled once per
    parameter shape, with the slice index traced."""
    def write(stacked, value, index):
        lead = (1,) * len(index)
        start = (*index, *(0,) * value.ndim)
        return jax.lax.dynamic_update_slice(stacked, value.reshape(lead + value.shape), start)

    placed = {} if sharding is None else {"out_shardings": sharding}
    return jax.jit(write, donate_argnums=(0,), **placed)


def _all_slices(lead: tuple[int, ...]) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(d) for d in lead)))


def _missing_name(key: tuple, entries: list[_Entry], abstract: dict, pending: dict) -> str:
    ent = next((e for e in entries if e.key == key), None)
    if ent is None:
        return ".".join(key)
    todo = pending.get(key) or _all_slices(abstract[key].shape[: len(ent.axes)])
    return ent.hf_name(min(todo))


def _locate(name: str, entries: list[_Entry], abstract: dict, table: WeightTable, source: str):
    """(entry, slice index) of an HF tensor in the model; (None, None) for a tensor to skip."""
    matched = None
    for ent in entries:
        m = ent.pattern.match(name)
        if not m:
            continue
        matched = m
        if ent.key not in abstract:
            if ".".join(ent.key) in table.optional:
                return None, None
            continue
        lead = abstract[ent.key].shape
        index = tuple(int(m.group(a)) - (ent.first if a == "i" else 0) for a in ent.axes)
        if all(0 <= j < d for j, d in zip(index, lead, strict=False)):
            return ent, index
    if matched is None:
        if table.ignored.match(name):
            return None, None
        raise DistillError(f"{source}: unexpected tensor {name!r} (not part of this architecture)")
    layers = [e.first + abstract[e.key].shape[0] for e in entries
              if "i" in e.axes and e.key in abstract]
    if "i" in matched.groupdict() and layers and int(matched["i"]) >= max(layers):
        raise DistillError(f"{source}: tensor {name!r} is beyond num_hidden_layers")
    raise DistillError(f"{source}: unexpected tensor {name!r} for this config")


def hf_tensor_specs(model: nnx.Module, dtype: np.dtype, table: WeightTable = DENSE,
                    ) -> list[tuple[str, tuple, np.dtype, tuple, tuple, str]]:
    """(HF name, HF shape, dtype, native key, slice index, layout) for every tensor of `model`."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = []
    for ent in _compile_table(table):
        if ent.key not in state:
            continue
        shape = state[ent.key].shape
        n = len(ent.axes)
        hf_shape = native_to_hf(np.empty(shape[n:], np.uint8), ent.layout).shape
        for index in sorted(_all_slices(shape[:n])):
            specs.append((ent.hf_name(index), tuple(hf_shape), dtype, ent.key, index, ent.layout))
    return specs


def _hf_tensor(state: dict, spec) -> np.ndarray:
    """Host copy of one HF tensor from the model state."""
    _, _, dt, key, index, layout = spec
    value = state[key][...][index] if index else state[key][...]
    value = np.asarray(jax.device_get(value))
    return native_to_hf(value, layout).astype(dt or value.dtype)


def iter_hf_tensors(model: nnx.Module, dtype=None, table: WeightTable = DENSE,
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every parameter slice, in table order (host copies, one at a time)."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in hf_tensor_specs(model, dtype, table):
        yield spec[0], _hf_tensor(state, spec)


def save_weights(model: nnx.Module, out_dir: Path, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 10**9, table: WeightTable = DENSE) -> list[Path]:
    """Write the model's weights as HF safetensors (sharded with an index when large)."""
    specs = hf_tensor_specs(model, np.dtype(jnp.dtype(dtype)), table)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_name = {s[0]: s for s in specs}
    plan = [(s[0], s[1], s[2]) for s in specs]
    return safetensors_io.write_checkpoint(
        out_dir, plan, lambda name: _hf_tensor(state, by_name[name]), max_shard_bytes)


def active_params(cfg) -> tuple[int, int]:
    """(total, active per token) parameters of a model config: a MoE layer uses its shared
    experts and `num_experts_per_tok` of its routed experts per token."""
    total = param_count(cfg)
    if not isinstance(cfg, MoEConfig):
        return total, total
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle
