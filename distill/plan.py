"""`distill plan`: will this model train (or generate) on this mesh? Answered before allocating.

The real training step (or the teacher's decode step) is compiled ahead of time for abstract,
sharded inputs on as many fake CPU devices as the mesh has; XLA's memory analysis gives the bytes
per device for arguments and temporaries and its cost analysis the FLOPs. Beside it, an analytic
count (parameters, optimizer state and gradients from the real shardings; activations from the
shapes) is printed, because XLA's CPU analysis can overstate what a GPU or TPU holds (it upcasts
bfloat16 matmuls and fuses less). The verdict says which figure it uses.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill.config import load_config, read_yaml
from distill.errors import DistillError
from distill.models.families import abstract_model, load_model_config, param_count
from distill.models.llama import hf as llama_hf
from distill.parallel import MESH_AXES, make_mesh, params_sharding, parse_mesh, state_shardings
from distill.pretrained import read_hf_config
from distill.train.config import LossConfig, TrainConfig, check_layout, check_seq_len
from distill.train.losses import make_loss_fn
from distill.train.optim import OptimConfig, make_optimizer, schedule
from distill.train.step import (
    TrainState,
    batch_sharding,
    make_step,
    split_trainable,
    state_sharding,
)

GiB = 2**30
PLANNED_PLATFORM = "gpu"  # what a plan is for (student.dtype auto -> bfloat16), compiled on CPU
_VERDICT_LABEL = {"larger": "the larger of the analytic and XLA totals",
                  "analytic": "the analytic total", "compiler": "the XLA total"}


@dataclasses.dataclass
class PlanReport:
    model: str
    mode: str
    mesh: dict
    batch: int
    seq_len: int
    params: int  # the model's parameters (a LoRA student's base, without its adapters)
    device_memory: float  # bytes
    compiler: dict  # argument / output / alias / temp / total bytes per device, flops
    # params (trainable: all, or a LoRA student's adapters) / frozen (its base) / optimizer /
    # gradients / activations / total bytes per device
    analytic: dict
    compile_s: float
    fits: bool
    verdict_source: str
    adapters: str | None = None  # a LoRA student: its adapters and base, in words

    def parts(self) -> dict[str, int]:
        """The analytic parts by name (what the table's rows and the verdict say)."""
        a = self.analytic
        if self.mode != "train":
            return {"parameters": a["params"], "activations / cache": a["activations"]}
        first = ({"parameters": a["params"]} if not self.adapters else
                 {"parameters, frozen base": a["frozen"], "adapters (trainable)": a["params"]})
        return {**first, "optimizer state": a["optimizer"], "gradients": a["gradients"],
                "activations": a["activations"]}

    def table(self) -> str:
        c, a = self.compiler, self.analytic
        rows = [(name, size, None) for name, size in self.parts().items()]
        rows += [("arguments (state, base, batch)", None, c.get("argument")),
                 ("temporaries", None, c.get("temp")),
                 ("total per device", a["total"], c.get("total"))]
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"plan: {self.model}, mode {self.mode}, mesh {mesh} ({math.prod(self.mesh.values())} "
                 f"devices), batch {self.batch} x {self.seq_len} tokens, "
                 f"{self.params / 1e9:.2f}B parameters"]
        lines += [f"student: {self.adapters}"] if self.adapters else []
        lines += ["", "| per device | analytic | XLA (CPU) |", "|---|---|---|"]
        for name, ana, comp in rows:
            lines.append(f"| {name} | {_gib(ana)} | {_gib(comp)} |")
        flops = c.get("flops")
        lines += ["", f"FLOPs per step per device (XLA): {flops:.3e}" if flops else
                  "FLOPs per step per device (XLA): n/a",
                  f"compiled in {self.compile_s:.1f} s",
                  f"verdict ({_VERDICT_LABEL[self.verdict_source]} vs "
                  f"{_gib(self.device_memory)} per device): "
                  + ("FITS" if self.fits else "DOES NOT FIT")]
        if not self.fits:
            lines.append(self.largest_part())
        return "\n".join(lines)

    def largest_part(self) -> str:
        """One line on a plan that does not fit: what is too big, and what shrinks it."""
        c, a = self.compiler, self.analytic
        state = {k: v for k, v in self.parts().items() if not k.startswith("activations")}
        if sum(state.values()) > self.device_memory:  # no batch or sequence change can help
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in state.items() if v)
            return (f"largest part: the {'training state' if self.mode == 'train' else 'weights'} "
                    f"alone ({parts}) needs {_gib(sum(state.values()))} per device, above "
                    f"{_gib(self.device_memory)}: {self._state_hint()}")
        use_compiler = "total" in c and (self.verdict_source == "compiler" or (
            self.verdict_source == "larger" and c["total"] > a["total"]))
        if use_compiler:
            source, total = "XLA", c["total"]
            parts = {"arguments (parameters, optimizer state, batch)": c["argument"],
                     "temporaries (activations, gradients)": c["temp"],
                     "outputs": c["output"] - c["alias"]}
        else:
            source, total = "analytic", a["total"]
            parts = self.parts()
        name, size = max(parts.items(), key=lambda kv: kv[1])
        if not name.startswith(("activations", "temporaries")):
            hint = self._state_hint()
        elif self.mode == "train":
            hint = ("lower --batch or --seq-len, raise train.grad_accum, set student.remat: "
                    "full (keeps only each layer's input), or split each row over a context "
                    "axis (--mesh ...,context=N)")
        else:
            hint = "lower --batch or --seq-len (the KV cache), or add tensor devices"
        return (f"largest part ({source}): {name}, {_gib(size)} of {_gib(total)} per device "
                f"({size / max(total, 1):.0%}); {hint}")

    def _state_hint(self) -> str:
        more = "spread it over more devices (a larger fsdp or tensor axis)"
        if self.mode == "train" and not self.adapters:
            return more + ", or train LoRA adapters on a frozen base (student.lora)"
        return more


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f} GiB"


def parse_bytes(text: str) -> float:
    """'80GB' / '80GiB' / '96e9' -> bytes (GB and GiB both read as 2**30, as device specs mean)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?)?\s*", text)
    if not m:
        raise DistillError(f"--device-memory {text!r}: expected e.g. 80GB")
    scale = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[
        m[2][0] if m[2] else None]
    return float(m[1]) * scale


# ---------------------------------------------------------------------------------------------
# Building the abstract problem


def _configs(config_path: Path, overrides, mesh_text: str, batch: int | None,
             seq_len: int | None):
    """(model config, training config or None for a bare preset YAML). For a training config,
    --mesh / --batch / --seq-len become its `mesh` / `data.batch_size` / `data.seq_len`, validated
    as `distill train` validates them."""
    data = read_yaml(config_path)
    if "model" in data:
        return load_model_config(config_path, overrides), None
    if "student" not in data:
        raise DistillError(f"{config_path}: neither a model preset (model:) nor a training config "
                           "(student:)")

    planned = [f"mesh={mesh_text}"]
    planned += [f"data.batch_size={batch}"] if batch is not None else []
    planned += [f"data.seq_len={seq_len}"] if seq_len is not None else []
    cfg = load_config(TrainConfig, config_path, [*overrides, *planned])
    init = Path(cfg.student.init)
    dtype = cfg.student.compute_dtype(PLANNED_PLATFORM)
    if init.suffix in (".yaml", ".yml"):
        model = load_model_config(init, [f"model.param_dtype={cfg.student.param_dtype}",
                                         f"model.dtype={dtype}"])
    else:
        model = llama_hf.config_from_hf(read_hf_config(init), str(init),
                                        param_dtype=cfg.student.param_dtype, dtype=dtype)
    # a LoRA / QLoRA student is planned as it trains: adapters trainable, the base frozen
    lora = {"lora": cfg.student.lora, "quantize": cfg.student.quantize}
    return model.model_copy(update={**cfg.student.model_updates(), **lora}), cfg


def _shard_bytes(abstract_tree, shardings_tree) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
            shardings_tree, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding)), strict=True):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def _compiler_figures(compiled) -> dict:
    mem = compiled.memory_analysis()
    out = {}
    if mem is not None:
        out = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
               "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes}
        out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    return out


def plan_train(model_cfg, train_cfg, mesh, batch: int, seq_len: int):
    """Compile the real training step for abstract sharded inputs; (compiled, analytic dict)."""

    optim = train_cfg.optim if train_cfg else OptimConfig()
    loss = train_cfg.loss if train_cfg else LossConfig()
    accum = train_cfg.train.grad_accum if train_cfg else 1
    tx = make_optimizer(optim, 1000)
    # a LoRA student trains its adapters; its frozen base is the step's third argument
    graphdef, params, frozen = split_trainable(abstract_model(model_cfg))
    state_sh = state_sharding(graphdef, tx, params, mesh)
    frozen_sh = params_sharding(frozen, mesh)
    opt = jax.eval_shape(tx.init, params)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(params, opt, step)
    b_sh = batch_sharding(mesh)
    batch_arrays = {k: jax.ShapeDtypeStruct((batch, seq_len), dt, sharding=b_sh) for k, dt in (
        ("tokens_bt", jnp.int32), ("targets_bt", jnp.int32), ("loss_mask_bt", jnp.bool_),
        ("segment_ids_bt", jnp.int32), ("positions_bt", jnp.int32))}
    fn = make_step(graphdef, tx, make_loss_fn(loss), schedule(optim, 1000), accum)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(state_sh, b_sh, frozen_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with _mesh_context(mesh):
        compiled = jitted.lower(state, batch_arrays, frozen).compile()
    p_bytes = _shard_bytes(params, state_sh.params)
    o_bytes = _shard_bytes(opt, state_sh.opt_state)
    # the trainable parameters get a gradient and optimizer state; the frozen base (a LoRA
    # student's, in its storage dtype or quantised) is only read
    analytic = {"params": p_bytes, "frozen": _shard_bytes(frozen, frozen_sh),
                "optimizer": o_bytes, "gradients": p_bytes,
                "activations": _train_activation_bytes(model_cfg, mesh, batch // accum, seq_len,
                                                       loss)}
    analytic["total"] = sum(analytic.values())
    return compiled, analytic


def _train_activation_bytes(cfg, mesh, batch: int, seq_len: int, loss) -> int:
    """Saved residual stream per layer (remat keeps only layer inputs), plus one layer's working
    set recomputed in the backward pass, plus the chunked loss head; batch over data x fsdp, the
    sequence over context x tensor (activations) and over context inside a layer, heads / MLP
    over tensor; with context parallelism each device also holds the whole row's keys and values
    of one layer (all-gather; the ring holds a chunk at a time, counted the same)."""
    shape = dict(mesh.shape)
    rows = max(1, math.ceil(batch / (shape["data"] * shape["fsdp"])))
    tp, cp = shape["tensor"], shape.get("context", 1)
    t_local = math.ceil(seq_len / (tp * cp))
    t_layer = math.ceil(seq_len / cp)  # tokens a device works on inside one layer
    act = np.dtype(cfg.dtype).itemsize
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    if hasattr(cfg, "head_size"):  # dense
        n, k, h, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, \
            cfg.intermediate_size
    else:  # MoE: the routed experts' working set is bounded by top-k x expert width
        n, k, h = cfg.num_attention_heads, cfg.num_attention_heads, cfg.qk_head_dim
        f = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    saved = layers * rows * t_local * d * act
    working = rows * t_layer * ((n + 2 * k) * h / tp + 3 * f / tp + 4 * d / tp) * 4 * 2
    gathered = rows * seq_len * 2 * k * h / tp * act * 2 if cp > 1 else 0  # K, V and their grads
    head = rows * min(loss.chunk, t_layer) * math.ceil(cfg.vocab_size / tp) * 4 * 3
    return int(saved + working + gathered + head)


def plan_generate(model_cfg, mesh, batch: int, seq_len: int):
    """Compile one decode step (one new token per row against a cache of `seq_len` slots)."""

    graphdef, params = nnx.split(abstract_model(model_cfg))
    p_sh = state_shardings(params, mesh)
    model = abstract_model(model_cfg)
    cache = jax.eval_shape(lambda: model.init_cache(batch, seq_len))
    rows = PartitionSpec(("data", "fsdp"))
    c_sh = jax.tree.map(lambda x: NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))),
                        cache)

    def decode(p, tokens, positions, cache, index, valid):
        m = nnx.merge(graphdef, p)
        return m.forward_cached(tokens, positions, cache, index, valid)

    b = NamedSharding(mesh, rows)
    args = (params, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=b),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=b), cache,
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_,
                                                                       sharding=b))
    jitted = jax.jit(decode, in_shardings=(p_sh, b, b, c_sh, None, b),
                     out_shardings=(b, c_sh), donate_argnums=(3,))
    with _mesh_context(mesh):
        compiled = jitted.lower(*args).compile()
    p_bytes = _shard_bytes(params, p_sh)
    c_bytes = _shard_bytes(cache, c_sh)
    analytic = {"params": p_bytes, "activations": c_bytes}
    analytic["total"] = p_bytes + c_bytes
    return compiled, analytic


def _mesh_context(mesh):
    setter = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return setter(mesh)


# ---------------------------------------------------------------------------------------------


def run_plan(config_path: str | Path, mesh_text: str, *, seq_len: int | None = None,
             batch: int | None = None, mode: str = "train", device_memory: str = "80GB",
             overrides=(), verdict: str = "larger") -> PlanReport:
    """Compile and measure; the caller must have enough CPU devices (`distill plan` re-runs itself with them)."""

    config_path = Path(config_path)
    shape = parse_mesh(mesh_text)
    model_cfg, train_cfg = _configs(config_path, overrides, mesh_text, batch, seq_len)
    n = math.prod(shape.values())
    mesh = make_mesh(shape, jax.devices("cpu")[:n])
    rows = shape.get("data", 1) * shape.get("fsdp", 1)
    if train_cfg:
        batch, seq_len = train_cfg.step_shape(seq_len)
    else:
        seq_len, batch = seq_len or 4096, batch or rows
    t0 = time.perf_counter()
    if mode == "train":  # exactly what `distill train` refuses, plan refuses
        check_layout(batch, train_cfg.train.grad_accum if train_cfg else 1, shape,
                     str(config_path), seq_len)
        check_seq_len(seq_len, model_cfg, str(config_path))
        compiled, analytic = plan_train(model_cfg, train_cfg, mesh, batch, seq_len)
    elif mode == "generate":
        compiled, analytic = plan_generate(model_cfg, mesh, batch, seq_len)
    else:
        raise DistillError(f"--mode {mode!r}: choose train or generate")
    compile_s = time.perf_counter() - t0
    comp = _compiler_figures(compiled)
    memory = parse_bytes(device_memory)
    figures = {"analytic": analytic["total"], "compiler": comp.get("total", analytic["total"])}
    figure = max(figures.values()) if verdict == "larger" else figures[verdict]
    base_params, adapters = _counts(model_cfg)
    return PlanReport(config_path.stem, mode, {k: shape.get(k, 1) for k in MESH_AXES},
                      batch, seq_len, base_params, memory, comp, analytic,
                      compile_s, figure <= memory, verdict, adapters)


def _counts(model_cfg) -> tuple[int, str | None]:
    """(the base model's parameters, a LoRA student's adapters and base in words or None)."""
    lora = getattr(model_cfg, "lora", None)
    quantize = getattr(model_cfg, "quantize", "none")
    if lora is None and quantize == "none":
        return param_count(model_cfg), None
    base = model_cfg.model_copy(update={"lora": None, "quantize": "none"})
    n_base = param_count(base)
    if lora is None:
        return n_base, f"frozen base ({quantize})"
    state = nnx.state(abstract_model(model_cfg), nnx.LoRAParam)
    n_lora = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
    storage = ("nf4 codes + float32 scales" if quantize == "nf4" else
               "int8 codes + float32 scales" if quantize == "int8" else model_cfg.param_dtype)
    return n_base, (f"LoRA rank {lora.rank} on {','.join(lora.targets)}: {n_lora:,} trainable "
                    f"float32 parameters ({n_lora / n_base:.2%} of the base); the frozen base "
                    f"in {storage}")
