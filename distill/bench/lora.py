"""`distill bench --suite lora`: a LoRA / QLoRA student's training step beside the full
fine-tune's, and what it learns.

The step: one process, one model (SmolLM2-135M, its real weights when a GGUF is at hand, else
its shape at random init), three compiled steps on the same batch: every parameter trained
(float32 AdamW), rank-R adapters on all seven projections of the frozen float32 base (LoRA), and
the same adapters on an nf4 base (QLoRA). The timed steps alternate (full, LoRA, QLoRA, full,
...), so a shared machine's noise falls on all alike; the figure is each one's median, and each
ratio the median of the per-round ratios. Memory is XLA's `memory_analysis` of each compiled
step (arguments + outputs - aliased + temporaries: what the step holds), not the process RSS,
which one process running all three cannot split (its peak is reported beside). The compiled
FLOPs (`cost_analysis`) show that the frozen weights get no gradient; like the dot count, they
are the HLO's, where the scanned layers' loop body counts once (the head + one layer).

The learning figure: `distill train` on SmolLM2-135M (real weights) and a small trace set (the
synthetic arithmetic task's reference traces, rendered with SmolLM2's tokenizer), N steps of
the full fine-tune and of LoRA (its lr 10x), the loss reduction of each (the first step's loss
minus the mean of the last few), their ratio, and the PEFT adapter file
(`distill.models.peft.save_adapter`) against its analytic size, sum over targets of
R * (in + out) * L * 4 bytes.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

from distill.bench.train import OPTIM, SMOLLM2_135M, _distill_batch, _random_batch, _resolve
from distill.data.prompts import PromptsConfig
from distill.models import lora
from distill.models.lora import TARGETS, LoraConfig
from distill.parallel import make_mesh, params_sharding
from distill.pretrained import init_model, load_pretrained
from distill.runs import METRICS
from distill.train.config import LossConfig
from distill.train.losses import make_loss_fn
from distill.train.optim import make_optimizer, schedule
from distill.train.step import (
    TrainState,
    batch_sharding,
    compile_step,
    make_step,
    split_trainable,
    state_sharding,
)

VARIANTS = {"full": None, "lora": "none", "qlora": "nf4"}  # name -> the base's quantisation


def bench_lora_step(model_path: str | Path | None = None, *, batch: int = 8, seq_len: int = 128,
                    rank: int = 64, repeats: int = 5, warmup: int = 1, preset=None) -> dict:
    """Full fine-tune vs LoRA vs QLoRA step on one device: median seconds, ratios pair by pair,
    compiled FLOPs, dot count and memory of each. `model_path`: a MODEL path (real weights);
    else `preset` (a DenseConfig or preset YAML; default the SmolLM2-135M shape) at random init."""
    mesh = make_mesh({}, jax.devices()[:1])
    base, name = _base(model_path, preset, mesh)
    tokens, targets = _random_batch(base.config.vocab_size, batch, seq_len)
    device_batch = jax.device_put(_distill_batch(tokens, targets), batch_sharding(mesh))
    cfg = LoraConfig(rank=rank, alpha=2.0 * rank)
    steps = {v: _compiled(base, v, cfg, device_batch, mesh, repeats + warmup) for v in VARIANTS}
    for _ in range(warmup):
        for s in steps.values():
            s["run"]()
    times = {v: [] for v in steps}
    for _ in range(repeats):
        for v, s in steps.items():
            t = time.perf_counter()
            s["run"]()
            times[v].append(time.perf_counter() - t)
    rows = {v: {**{k: x for k, x in s.items() if k != "run"},
                "step_s": statistics.median(times[v]), "step_s_all": times[v]}
            for v, s in steps.items()}
    for v in ("lora", "qlora"):
        rows[v]["vs_full"] = statistics.median(a / b for a, b in zip(times[v], times["full"],
                                                                      strict=True))
    return {"model": name, "batch": batch, "seq_len": seq_len, "rank": rank,
            "repeats": repeats, "backend": jax.default_backend(),
            "memory": "XLA memory_analysis of each compiled step (arguments + outputs - aliased "
                      "+ temporaries)",
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "variants": rows}


def _base(model_path, preset, mesh):
    """(the float32 base model on `mesh`, its name in words)."""
    if model_path is not None:
        model, _ = load_pretrained(model_path, param_dtype="float32", dtype="float32", mesh=mesh)
        return model, f"{Path(model_path).name} (real weights)"
    name, cfg = _resolve(preset if preset is not None else SMOLLM2_135M)
    name = "SmolLM2-135M shape (random init)" if preset is None else name
    cfg = cfg.model_copy(update={"dtype": "float32", "param_dtype": "float32"})
    return init_model(cfg, seed=0, mesh=mesh), name


def _compiled(base, variant: str, cfg: LoraConfig, device_batch, mesh, total_steps: int) -> dict:
    """One variant's compiled step and its figures; "run" does one step on its own state."""
    model = nnx.clone(base)
    if VARIANTS[variant] is not None:
        lora.adapt(model, cfg, VARIANTS[variant], jax.random.key(0))
    tx = make_optimizer(OPTIM, total_steps)
    graphdef, params, frozen = split_trainable(model)
    params = jax.tree.map(jnp.copy, params)  # the state is donated: never the base's arrays
    state_sh = state_sharding(graphdef, tx, params, mesh)
    step = compile_step(make_step(graphdef, tx, make_loss_fn(LossConfig()),
                                  schedule(OPTIM, total_steps)),
                        state_sh, mesh, params_sharding(frozen, mesh))
    state = TrainState(params, jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                       jax.device_put(jnp.zeros((), jnp.int32), state_sh.step))
    t = time.perf_counter()
    compiled = step.lower(state, device_batch, frozen).compile()
    figures = {"compile_s": time.perf_counter() - t, **_figures(compiled),
               "trainable_params": sum(x.size for x in jax.tree.leaves(params))}
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], device_batch, frozen)
        jax.block_until_ready((holder[0], metrics))

    return {**figures, "run": run}


def _figures(compiled) -> dict:
    """FLOPs (cost_analysis), dot ops in the optimised HLO, and the step's memory."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    return {"flops": float(cost["flops"]), "dots": compiled.as_text().count(" dot("),
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "memory_bytes": total}


# ---------------------------------------------------------------------------------------------
# The learning figure

PROMPTS = {"source": "synthetic", "synthetic": {"n": 600, "seed": 0, "style": "compact",
                                                "min_steps": 2, "max_steps": 3}}


def bench_lora_learning(model_path: str | Path, *, steps: int = 30, batch: int = 8,
                        seq_len: int = 256, rank: int = 64, lr: float = 1e-4,
                        lora_lr: float = 1e-3, tail: int = 5) -> dict:
    """`distill train` of the full model (lr) vs LoRA rank `rank` (lora_lr) for `steps` steps on
    the same traces and batches: each loss reduction, their ratio, and the adapter file's size
    against its analytic size."""
    from distill.models.peft import save_adapter  # export's: imported where it is used
    from distill.traces.reference import write_reference_traces
    from distill.train.loop import run_train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        traces = write_reference_traces(PromptsConfig(**PROMPTS), work / "traces")
        data = {"traces": [str(traces)], "seq_len": seq_len, "batch_size": batch}
        devices = jax.devices()[:1]
        runs = {"full": ({}, lr), "lora": ({"lora": {"rank": rank, "alpha": 2.0 * rank}}, lora_lr)}
        out = {}
        for name, (student, rate) in runs.items():
            t = time.perf_counter()
            run_train(_config(work, name, model_path, steps, rate, student, data), progress=False,
                      devices=devices)
            out[name] = {**_reduction(work / name, tail), "lr": rate,
                         "wall_s": time.perf_counter() - t}
        model, _ = load_pretrained(work / "lora")
        adapter = save_adapter(model, work / "adapter", str(model_path))
        file_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    analytic = adapter_bytes(model.config, model.config.lora)
    return {"model": str(model_path), "steps": steps, "batch": batch, "seq_len": seq_len,
            "rank": rank, "tail": tail, **out,
            "reduction_ratio": out["lora"]["reduction"] / out["full"]["reduction"],
            "adapter_file_bytes": file_bytes, "adapter_analytic_bytes": analytic,
            "adapter_size_ratio": file_bytes / analytic}


def _config(work: Path, name: str, model_path, steps: int, lr: float, student: dict,
            data: dict) -> Path:
    cfg = {"name": name, "student": {"init": str(model_path), **student}, "data": data,
           "optim": {"lr": lr, "warmup_steps": 2, "schedule": "constant", "weight_decay": 0.0},
           "train": {"steps": steps, "log_every": 1, "checkpoint_every": steps,
                     "async_checkpoints": False, "prefetch": 0},
           "output_root": str(work)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _reduction(run_dir: Path, tail: int) -> dict:
    losses = [r["loss"] for r in map(json.loads, (run_dir / METRICS).read_text().splitlines())
              if "loss" in r and "step_s" in r]
    last = statistics.fmean(losses[-tail:])
    return {"first_loss": losses[0], "last_loss": last, "reduction": losses[0] - last,
            "losses": losses}


def adapter_bytes(model_cfg, cfg: LoraConfig) -> int:
    """sum over targets of R * (in + out) * L * 4 bytes (float32 A and B)."""
    c = model_cfg
    q, kv = c.num_attention_heads * c.head_size, c.num_key_value_heads * c.head_size
    d, f = c.hidden_size, c.intermediate_size
    sizes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f),
             "down": (f, d)}
    assert set(sizes) == set(TARGETS)
    return sum(cfg.rank * sum(sizes[t]) for t in cfg.targets) * c.num_hidden_layers * 4


# ---------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    """The suite's report: the step table, then the learning figure (when it ran)."""
    s = result["step"]
    lines = [f"LoRA / QLoRA vs full fine-tune step, {s['model']}, batch {s['batch']} x "
             f"{s['seq_len']} tokens, rank {s['rank']} on all seven projections, {s['backend']}, "
             f"median of {s['repeats']} alternating rounds; memory: {s['memory']}", "",
             "| step | trainable params | step s | vs full | GFLOP (XLA)* | dots* | memory |",
             "|---|---|---|---|---|---|---|"]
    for v, r in s["variants"].items():
        ratio = f"{r['vs_full']:.2f}x" if "vs_full" in r else "1.00x"
        lines.append(f"| {v} | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.3f} | {ratio} "
                     f"| {r['flops'] / 1e9:.1f} | {r['dots']} | "
                     f"{r['memory_bytes'] / 2**30:.2f} GiB |")
    lines.append("\n* of the compiled HLO, where the scanned layers' loop body counts once\n"
                 f"process peak RSS (all three): {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    learn = result.get("learning")
    if learn is None:
        return "\n".join(lines + ["learning figure: skipped (no SmolLM2 GGUF)"])
    full, lo = learn["full"], learn["lora"]
    lines += ["", f"learning, {learn['model']}: {learn['steps']} steps of {learn['batch']} x "
              f"{learn['seq_len']} tokens (loss: first step -> mean of the last {learn['tail']})",
              f"  full fine-tune (lr {full['lr']:g}): {full['first_loss']:.3f} -> "
              f"{full['last_loss']:.3f} (-{full['reduction']:.3f}), {full['wall_s']:.0f} s",
              f"  LoRA r{learn['rank']} (lr {lo['lr']:g}): {lo['first_loss']:.3f} -> "
              f"{lo['last_loss']:.3f} (-{lo['reduction']:.3f}), {lo['wall_s']:.0f} s",
              f"  LoRA / full loss reduction: {learn['reduction_ratio']:.0%}",
              f"  adapter file {learn['adapter_file_bytes']:,} bytes vs analytic "
              f"{learn['adapter_analytic_bytes']:,} ({learn['adapter_size_ratio'] - 1:+.2%})"]
    return "\n".join(lines)
