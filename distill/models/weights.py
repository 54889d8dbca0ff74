"""Hugging Face <-> native weights: the declarative table machinery every family's table uses.

A table row is (HF name, native path, layout). `{i}` marks a per-layer tensor that lands in slice
i of a parameter stacked on L (`{e}`, an expert's, in slice [i, e]; `WeightTable` has the details).
The tables themselves are the families' (`distill.models.llama.hf`, `distill.models.deepseek.hf`);
`build_from_tensors` takes any table and model class. Layouts:
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
from jax.sharding import Mesh, NamedSharding

from distill.errors import DistillError
from distill.models import safetensors_io
from distill.models.lazy import LazyTensor, whole
from distill.parallel import variable_sharding

Row = tuple[str, str, str]

def decoder_rows(stack: str) -> tuple[Row, ...]:
    """The rows every decoder family shares: embedding, final norm, output head, and each layer's
    two norms (`stack`: the native path of the layers, e.g. "blocks" or "{stack}")."""
    return (
        ("model.embed_tokens.weight", "embed.embedding_vd", "same"),
        ("model.norm.weight", "final_norm_d", "same"),
        ("lm_head.weight", "lm_head_dv", "t1"),
        ("model.layers.{i}.input_layernorm.weight", f"{stack}.attn_norm_d", "same"),
        ("model.layers.{i}.post_attention_layernorm.weight", f"{stack}.mlp_norm_d", "same"),
    )


# Buffers that some checkpoints carry and that hold no learned weight.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


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


def build_from_tensors(cfg, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                       mesh: Mesh | None = None, *, table: WeightTable,
                       model_cls: type[nnx.Module]) -> nnx.Module:
    """Assemble a model from (HF name, array) pairs streamed one at a time, as `table` says.

    Without a mesh, each tensor goes to the device as soon as it arrives: a stacked parameter is
    allocated on the device first and every layer's (or expert's) slice is written into it in
    place. Host memory therefore holds one tensor at a time, not a stacked parameter
    (DeepSeek-V3's routed experts are 58 x 256 x 7168 x 2048 per projection, 436 GB in bfloat16).
    On a mesh, lazy tensors (`distill.models.lazy`, as the safetensors reader gives) are read
    per device shard once a parameter's tensors are all known: each process reads only the parts
    of them its own devices hold, once per distinct shard, one tensor's part at a time (see
    `_place_shards`); arrays (GGUF) are placed as they arrive, sharded.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))
    abstract = dict(nnx.to_flat_state(state))
    fill_state(abstract, tensors, source, mesh, table=table)
    return nnx.merge(graphdef, nnx.from_flat_state(abstract))


def fill_state(abstract: dict, tensors: Iterable[tuple[str, np.ndarray]], source: str,
               mesh: Mesh | None = None, *, table: WeightTable) -> None:
    """Set every variable of a flat state (`abstract`: native key -> nnx.Variable, abstract or
    not) from a stream of (HF name, array) pairs, as `table` says, one tensor at a time (see
    `build_from_tensors`). A tensor that is unexpected, repeated or misshapen, or a variable
    left without one, is a DistillError naming it."""
    entries = _compile_table(table)
    stacked: dict[tuple, jax.Array] = {}
    pending: dict[tuple, set[tuple[int, ...]]] = {}
    planned: dict[tuple, dict[tuple[int, ...], LazyTensor]] = {}  # read per shard (on a mesh)
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
        todo.discard(index)
        sharding = variable_sharding(var, mesh) if mesh is not None else None
        if sharding is not None and isinstance(array, LazyTensor):
            planned.setdefault(ent.key, {})[index] = array
            if not todo:
                done[ent.key] = _place_shards(var, planned.pop(ent.key), ent.layout, sharding)
            continue
        value = hf_to_native(whole(array), shape, ent.layout).astype(var.dtype)
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


def _place_shards(var, parts: dict[tuple[int, ...], LazyTensor], layout: str,
                  sharding: NamedSharding) -> jax.Array:
    """A parameter made from its shards, each read from `parts` (HF tensor per slice index of
    the leading stacked axes) where this process's devices hold it: a distinct shard is read once
    (one tensor's part at a time, written in place on its device) and copied to the devices that
    hold the same one."""
    lead = len(next(iter(parts)))
    made: dict[tuple, jax.Array] = {}
    shards = []
    for device, index in sharding.addressable_devices_indices_map(var.shape).items():
        box = tuple(s.indices(n)[:2] for s, n in zip(index, var.shape, strict=True))
        if box in made:
            shards.append(jax.device_put(made[box], device))
            continue
        rest = [np.arange(a, b) for a, b in box[lead:]]
        if not lead:
            shard = jax.device_put(read_native(parts[()], layout, var.shape, rest)
                                   .astype(var.dtype), device)
        else:
            shard = jnp.zeros(tuple(b - a for a, b in box), var.dtype, device=device)
            for at in itertools.product(*(range(a, b) for a, b in box[:lead])):
                value = read_native(parts[at], layout, var.shape[lead:], rest).astype(var.dtype)
                local = tuple(i - a for i, (a, _) in zip(at, box, strict=False))
                shard = _write_slice(None)(shard, jax.device_put(value, device), local)
        made[box] = shard
        shards.append(shard)
    return jax.make_array_from_single_device_arrays(var.shape, sharding, shards)


def read_native(tensor: LazyTensor, layout: str, native_shape: tuple[int, ...],
                index: list[np.ndarray]) -> np.ndarray:
    """The part of an HF tensor's native layout (`hf_to_native`) at the outer product of
    `index` (one index array per native dim), reading only that part of the tensor."""
    k = int(layout[1:]) if layout.startswith("t") else 0
    # HF's tensor seen as `view` (out dims, then in dims: a reshape of [out, in]); the native
    # array is view.transpose(perm); `groups`: the view dims each stored dim splits into
    n = len(native_shape)
    perm = [*range(n - k, n), *range(n - k)] if k else list(range(n))
    view = [native_shape[j] for j in np.argsort(perm)]
    groups = ([list(range(n))] if layout == "flat" else
              [list(range(n - k)), list(range(n - k, n))] if k else [[j] for j in range(n)])
    at = [index[perm.index(v)] for v in range(n)]  # the index of each view dim
    stored = tuple(np.ravel_multi_index(np.ix_(*(at[v] for v in g)), [view[v] for v in g])
                   .ravel() for g in groups)
    part = tensor.read(stored).reshape([len(a) for a in at])
    return part.transpose(perm)


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


def hf_tensor_specs(model: nnx.Module, dtype: np.dtype, table: WeightTable,
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


def iter_hf_tensors(model: nnx.Module, table: WeightTable, dtype=None,
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every parameter slice, in table order (host copies, one at a time)."""
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in hf_tensor_specs(model, dtype, table):
        yield spec[0], _hf_tensor(state, spec)


def save_weights(model: nnx.Module, out_dir: Path, table: WeightTable, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write the model's weights as HF safetensors (sharded with an index when large)."""
    specs = hf_tensor_specs(model, np.dtype(jnp.dtype(dtype)), table)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_name = {s[0]: s for s in specs}
    plan = [(s[0], s[1], s[2]) for s in specs]
    return safetensors_io.write_checkpoint(
        out_dir, plan, lambda name: _hf_tensor(state, by_name[name]), max_shard_bytes)


def save_weights_file(model: nnx.Module, path: Path, table: WeightTable,
                      dtype: str = "float32") -> Path:
    """Write the model's tensors that `table` names into the one safetensors file `path`
    (a PEFT adapter's adapter_model.safetensors: small, never sharded)."""
    specs = hf_tensor_specs(model, np.dtype(jnp.dtype(dtype)), table)
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_name = {s[0]: s for s in specs}
    safetensors_io.write_file(path, [(s[0], s[1], s[2]) for s in specs],
                              lambda name: _hf_tensor(state, by_name[name]))
    return path
