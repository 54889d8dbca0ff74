"""Training throughput: distill's compiled training step vs transformers + PyTorch, in one run.

Both sides train the same architecture on the same random tokens: same batch and sequence length,
AdamW hyper-parameters, global-norm clipping and weight-decay mask (matrices and embeddings only),
and mean cross-entropy over every position. distill runs its real step (`distill.train.step`,
`make_loss_fn`, `make_optimizer`), jitted once per remat policy; transformers runs
`LlamaForCausalLM` / `Qwen2ForCausalLM` built from the same config (SDPA attention,
`torch.optim.AdamW`), eagerly and, where it compiles, under `torch.compile`.

Every contestant gets untimed warm-up steps (compilation, allocator warm-up), then the timed steps
are interleaved, one step of each in turn, so the noise of a shared machine falls on all alike;
each contestant's figure is its median step time.

MFU is achieved FLOP/s (the analytic `dense_flops_per_token` times tokens/s) over the matmul peak
measured in the same run (`matmul_peak`: a jitted square matmul, the best over a few sizes,
measured before the first round of timed steps and after every round; the median of those). On a
GPU backend distill computes in bfloat16 (float32 master weights and optimizer state) and the peak
is the bfloat16 one.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.errors import DistillError
from distill.models.families import load_model_config, param_count
from distill.models.llama.config import DenseConfig
from distill.models.llama.hf import config_to_hf
from distill.parallel import make_mesh, params_sharding
from distill.pretrained import init_model
from distill.train.config import LossConfig
from distill.train.flops import dense_flops_per_token, matmul_peak
from distill.train.losses import make_loss_fn
from distill.train.optim import OptimConfig, make_optimizer, schedule
from distill.train.step import (
    TrainState,
    batch_sharding,
    compile_step,
    make_step,
    split_trainable,
    state_sharding,
)

# The SmolLM2-135M architecture (its config.json): a Llama with tied embeddings, 134.5M
# parameters. It is the project's real-model case (fine-tuned, exported and compared with
# transformers elsewhere), so its throughput is the one a user of this toolkit on a small machine
# sees. Its matmuls are narrow (D = 576), which is the hard case for MFU.
SMOLLM2_135M = DenseConfig(
    family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

QWEN25_1_5B = Path(__file__).resolve().parents[2] / "configs" / "students" / "qwen2.5-math-1.5b.yaml"

# The same AdamW on both sides: constant lr, decay on matrices and embeddings only, clip at 1.
OPTIM = OptimConfig(lr=1e-4, schedule="constant", weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                    clip_norm=1.0)

StepFn = Callable[[], None]  # runs one training step and waits for its result

log = logging.getLogger(__name__)  # one line per warm-up and timed step (a long run's progress)


def bench_train(batch: int = 8, seq_len: int = 512, steps: int = 5,
                preset: DenseConfig | str | Path | None = None,
                remats: Sequence[str] = ("dots", "dots_no_batch"), compare: bool = True,
                torch_compile: bool = True, peak_sizes: Sequence[int] | None = None,
                warmup: int = 1) -> list[dict]:
    """Training tokens/s of distill (one row per remat policy) and of transformers + PyTorch
    (eager, and `torch.compile` when asked and it works), each row with FLOPs/token, achieved
    FLOP/s, the measured matmul peak and MFU.

    preset: a DenseConfig, a model preset YAML, or None for the SmolLM2-135M shape.
    remats: the policies tried ("none" is not a default: at batch 8 x 512 it keeps 14 GB of
    [B, N, T, S] attention tensors for the backward pass, and at batch 4 it measured slower than
    "dots" on a 2-core CPU).
    peak_sizes: square matmul sizes the peak is measured at (default: 2048 and 4096 on CPU, near
    the model's own matmuls in FLOPs; 4096 to 16384 on a GPU, where smaller ones are too short
    to time). A remat policy whose step needs more memory than the machine has free is skipped
    (a row says so). The fastest distill row has `best: True`; `vs_transformers` is a row's
    tokens/s over transformers eager's.
    """
    name, cfg = _resolve(preset)
    gpu = jax.default_backend() == "gpu"
    dtype = "bfloat16" if gpu else "float32"
    peak_sizes = peak_sizes or ((4096, 8192, 16384) if gpu else (2048, 4096))
    cfg = cfg.model_copy(update={"dtype": dtype, "param_dtype": "float32"})
    tokens, targets = _random_batch(cfg.vocab_size, batch, seq_len)
    # leave half of the free memory to the torch model's step when it runs too
    fns, notes = _distill_steps(cfg, _distill_batch(tokens, targets), remats,
                                len(remats) * (warmup + steps),
                                memory_share=0.5 if compare else 0.9)
    optional = set()
    if compare:
        torch_fns, optional = _torch_steps(cfg, tokens, targets, torch_compile)
        fns.update(torch_fns)
    warm = _warm_up(fns, warmup, optional)
    times, peaks = _interleaved(fns, steps, lambda: _peak(dtype, peak_sizes))
    peak = {"flops": statistics.median(p for p, _ in peaks), "all": peaks,
            "what": f"{dtype} square matmul, best of sizes {'/'.join(map(str, peak_sizes))} "
                    "each round, median over rounds"}
    return _rows(name, cfg, batch, seq_len, times, warm, peak, notes)


def bench_train_gpu_preset(batch: int = 8, seq_len: int = 2048, steps: int = 5) -> list[dict]:
    """MFU of the Qwen2.5-1.5B student preset in bfloat16 on the GPU (distill only); [] when the
    backend is not a GPU."""
    if jax.default_backend() != "gpu":
        return []
    return bench_train(batch, seq_len, steps, QWEN25_1_5B, remats=("dots_no_batch", "full"),
                       compare=False)


# ---------------------------------------------------------------------------------------------
# Inputs and peak


def _resolve(preset) -> tuple[str, DenseConfig]:
    if preset is None:
        return "SmolLM2-135M shape", SMOLLM2_135M
    if isinstance(preset, DenseConfig):
        return f"{preset.family} D={preset.hidden_size} L={preset.num_hidden_layers}", preset
    cfg = load_model_config(preset)
    if not isinstance(cfg, DenseConfig):
        raise DistillError(f"{preset}: the training benchmark needs a dense (llama / qwen2) preset")
    return Path(preset).stem, cfg


def _random_batch(vocab: int, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens [B, T] and their next-token targets [B, T] (int32), the same for both sides."""
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    return ids[:, :-1], ids[:, 1:]


def _peak(dtype: str, sizes: Sequence[int]) -> tuple[float, int]:
    """(best measured matmul FLOP/s, the size it was measured at)."""
    return max((matmul_peak(jnp.dtype(dtype), size, repeats=3), size) for size in sizes)


def _free_bytes() -> int | None:
    """Free memory of the default device (accelerators), or MemAvailable (CPU); None: unknown."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")), None)
    return None if kb is None else kb * 1024


# ---------------------------------------------------------------------------------------------
# The two sides


def _distill_steps(cfg: DenseConfig, batch: dict[str, np.ndarray], remats: Sequence[str],
                   total_steps: int, memory_share: float
                   ) -> tuple[dict[tuple[str, str], StepFn], dict]:
    """One compiled step per remat policy, all threading one shared (donated) TrainState, and
    notes per policy: the step's temporary memory, or why it was skipped. `batch`: the training
    batch dict (`_distill_batch`, or packed rows with their segments and positions)."""

    mesh = make_mesh({}, jax.devices()[:1])  # one device: the same hardware torch gets
    model = init_model(cfg, seed=0, mesh=mesh)
    tx = make_optimizer(OPTIM, total_steps)
    graphdef, params, frozen = split_trainable(model)
    state_sh = state_sharding(graphdef, tx, params, mesh)
    frozen_sh = params_sharding(frozen, mesh)
    holder = [TrainState(params, jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                         jax.device_put(jnp.zeros((), jnp.int32), state_sh.step))]
    device_batch = jax.device_put(batch, batch_sharding(mesh))
    loss_fn = make_loss_fn(LossConfig())
    fns, notes = {}, {}
    for policy in remats:
        key = ("distill", f"remat={policy}")
        model.config = cfg.model_copy(update={"remat": policy})  # the graphdef carries the policy
        step = compile_step(make_step(nnx.graphdef(model), tx, loss_fn,
                                      schedule(OPTIM, total_steps)), state_sh, mesh, frozen_sh)
        t = time.perf_counter()
        compiled = step.lower(holder[0], device_batch, frozen).compile()  # compiled once, here
        temp, free = _temp_bytes(compiled), _free_bytes()
        notes[key] = {"compile_s": time.perf_counter() - t, "temp_bytes": temp}
        log.info("compiled %s %s: %.1f s, %.2f GB temporaries", *key, notes[key]["compile_s"],
                 (temp or 0) / 1e9)
        if temp is not None and free is not None and temp > memory_share * free:
            notes[key]["skipped"] = (f"needs {temp / 1e9:.1f} GB of temporaries; "
                                     f"{free / 1e9:.1f} GB free")
            continue

        def run(compiled=compiled):
            holder[0], metrics = compiled(holder[0], device_batch, frozen)
            jax.block_until_ready((holder[0], metrics))

        fns[key] = run
    return fns, notes


def _distill_batch(tokens, targets) -> dict[str, np.ndarray]:
    """The training batch dict: every position a target, one document per row."""
    b, t = tokens.shape
    return {"tokens_bt": tokens, "targets_bt": targets, "loss_mask_bt": np.ones((b, t), bool),
            "segment_ids_bt": np.ones((b, t), np.int32),
            "positions_bt": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}


def _temp_bytes(compiled) -> int | None:
    """Bytes of temporaries the compiled step allocates (None where the backend does not say)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def _torch_steps(cfg: DenseConfig, tokens, targets, compile_too: bool
                 ) -> tuple[dict[tuple[str, str], StepFn], set]:
    """transformers' model of the same config with torch AdamW: eager (and torch.compile'd, which
    shares the parameters and optimizer). The compiled one is optional: it may fail to build."""
    import torch  # the hf extra: imported only where the reference side runs
    import torch.nn.functional as F

    gpu = jax.default_backend() == "gpu"
    if gpu and not torch.cuda.is_available():
        warnings.warn("jax runs on the GPU but torch has no CUDA: no transformers comparison",
                      stacklevel=2)
        return {}, set()
    device = "cuda" if gpu else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model = _hf_model(cfg).to(device).train()
    opt = _torch_adamw(model)
    inputs = torch.from_numpy(np.asarray(tokens, np.int64)).to(device)
    labels = torch.from_numpy(np.asarray(targets, np.int64)).to(device).reshape(-1)

    def make(forward):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, torch.bfloat16, enabled=gpu):
                logits = forward(input_ids=inputs).logits  # [B, T, V]
            loss = F.cross_entropy(logits.float().reshape(labels.shape[0], -1), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_norm)
            opt.step()
            loss.item()  # waits for the step (CUDA too)
        return run

    fns = {("transformers", f"eager (sdpa, {opt.kind} AdamW)"): make(model)}
    optional = set()
    if compile_too:
        key = ("transformers", f"torch.compile (inductor, {opt.kind} AdamW)")
        fns[key] = make(torch.compile(model))
        optional.add(key)
    return fns, optional


def _hf_model(cfg: DenseConfig):
    """LlamaForCausalLM / Qwen2ForCausalLM of the same config, float32, SDPA attention."""
    import torch  # the hf extra: imported only where the reference side runs
    from transformers import AutoConfig, AutoModelForCausalLM


    hf = config_to_hf(cfg, "float32")
    hf.pop("architectures")
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **{**hf, "use_cache": False})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                            dtype=torch.float32)


def _torch_adamw(model):
    """torch AdamW with OPTIM's hyper-parameters and decay on >= 2-D weights only (distill's
    mask: no decay on norm scales and biases); the fused kernel where this torch has it."""
    import torch  # the hf extra: imported only where the reference side runs

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": OPTIM.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kw)
        opt.kind = "fused"
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, foreach=True, **kw)
        opt.kind = "foreach"
    return opt


# ---------------------------------------------------------------------------------------------
# Timing and rows


def _warm_up(fns: dict, warmup: int, optional: set) -> dict:
    """Run each contestant `warmup` times untimed (the first includes compilation); returns the
    seconds each took. An optional contestant that fails is dropped with a warning."""
    seconds = {}
    for key in list(fns):
        t = time.perf_counter()
        try:
            for _ in range(max(warmup, 1)):
                fns[key]()
        except Exception as e:  # torch.compile needs a working toolchain; it is optional
            if key not in optional:
                raise
            warnings.warn(f"{key[1]} skipped: {type(e).__name__}: {str(e).splitlines()[0]}",
                          stacklevel=2)
            del fns[key]
            continue
        seconds[key] = time.perf_counter() - t
        log.info("warm-up %s %s: %.1f s", *key, seconds[key])
    return seconds


def _interleaved(fns: dict, steps: int, measure_peak: Callable[[], tuple[float, int]]
                 ) -> tuple[dict, list]:
    """Seconds of each timed step per contestant, one step of each in turn, and the matmul peak
    measured before the first round and after every round (the machine's state changes)."""
    times = {key: [] for key in fns}
    peaks = [measure_peak()]
    for _ in range(steps):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
            log.info("step %s %s: %.1f s", *key, times[key][-1])
        peaks.append(measure_peak())
        log.info("matmul peak %.1f GFLOP/s", peaks[-1][0] / 1e9)
    return times, peaks


def _rows(name, cfg, batch, seq_len, times, warm, peak, notes) -> list[dict]:
    flops_tok = dense_flops_per_token(cfg, seq_len)
    common = {"benchmark": "train", "model": name, "params": param_count(cfg), "batch": batch,
              "seq_len": seq_len, "dtype": cfg.dtype, "flops_per_token": flops_tok,
              "peak_flops_per_s": peak["flops"], "peak_flops_per_s_all": peak["all"],
              "peak": peak["what"]}
    ref = next((k for k in times if k[0] == "transformers" and k[1].startswith("eager")), None)
    ref_tps = batch * seq_len / statistics.median(times[ref]) if ref else None
    rows = []
    for (impl, setting), ts in times.items():
        tps = batch * seq_len / statistics.median(ts)
        rows.append({**common, "impl": impl, "setting": setting, "steps": len(ts),
                     "step_s": statistics.median(ts), "step_s_all": ts,
                     "warmup_s": warm[(impl, setting)], "tokens_per_s": tps,
                     "flops_per_s": flops_tok * tps, "mfu": flops_tok * tps / peak["flops"],
                     "vs_transformers": tps / ref_tps if ref_tps else None, "best": False,
                     "skipped": None, **notes.get((impl, setting), {})})
    ours = [r for r in rows if r["impl"] == "distill"]
    if ours:
        max(ours, key=lambda r: r["tokens_per_s"])["best"] = True
    skipped = [{**common, "impl": impl, "setting": setting, **note}
               for (impl, setting), note in notes.items() if "skipped" in note]
    return rows + skipped


def train_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines of the training rows, one table per model (empty without rows)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _model_table([r for r in rows if r["model"] == model])
    return lines


def _model_table(rows: Sequence[dict]) -> list[str]:
    r0 = rows[0]
    lines = [f"Training step, {r0['model']} ({r0['params'] / 1e6:.1f}M params), batch "
             f"{r0['batch']} x {r0['seq_len']} tokens, {r0['dtype']}, AdamW; "
             f"{r0['flops_per_token'] / 1e6:.0f} MFLOP/token; peak "
             f"{r0['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({r0['peak']})", "",
             "| impl | setting | step s (median) | tokens/s | vs transformers | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['impl']} | {r['setting']} | skipped: {r['skipped']} | | | | |")
            continue
        ratio = "" if r["vs_transformers"] is None else f"{r['vs_transformers']:.2f}x"
        star = " (best)" if r["best"] else ""
        lines.append(f"| {r['impl']} | {r['setting']}{star} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {r['flops_per_s'] / 1e9:.1f} | "
                     f"{100 * r['mfu']:.1f}% |")
    return lines + [""]
