"""`distill bench --suite device`: the accelerator path in one run, one JSON file.

1. Kernel parity: each attention path this platform has (Pallas splash on TPU; cuDNN and the
   Pallas flash kernel on GPU; the Pallas kernels interpreted on CPU; blockwise everywhere)
   against the dense float32 reference at full matmul precision, forward and gradients, on packed
   causal grouped-query rows. Errors are relative to the reference's largest magnitude.
2. Training-step MFU at 8k packed tokens with random weights: the Qwen2.5-1.5B shape (float32
   master weights, bfloat16 compute) and the Qwen2.5-7B shape (bfloat16 parameters and
   optimizer state). FLOPs are `dense_flops_per_token` with attention over the real documents
   (packed rows attend within a document); MFU is against the measured bfloat16 matmul peak and,
   where the device is known, its nominal dense peak.
3. Decode tokens/s of the inference engine (one slot a row) at batch 1 and 64 (the 1.5B shape,
   bfloat16 weights and KV cache) beside the HBM-bandwidth limit: a step must read every weight
   and the KV cache once, so
   limit = batch / ((weight bytes + cache bytes) / measured bandwidth).
4. Time to first step: a fresh model to the end of its first training step (initialisation,
   compilation, the step).

On CPU (or with small=True) the shapes are the tiny presets', so the whole suite runs in about a
minute: how the command is tested where no accelerator is.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.bench.engine import bench_engine, decode_steps_computed
from distill.bench.train import QWEN25_1_5B, _distill_steps, _peak, _resolve
from distill.models.attention import (
    MaskInfo,
    blockwise_attention,
    dot_product_attention,
)
from distill.models.kernels import cudnn_attention, fused_attention
from distill.pretrained import init_model
from distill.sampling import SamplingParams
from distill.train.flops import dense_flops_per_token

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "students"
QWEN25_7B = CONFIGS / "qwen2.5-math-7b.yaml"
TINY = CONFIGS / "tiny-qwen2.yaml"

# Nominal dense bfloat16 peak FLOP/s and HBM bytes/s by `device_kind` prefix (vendor sheets).
NOMINAL = {
    "NVIDIA H200": (989e12, 4.8e12), "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100": (989e12, 3.35e12), "NVIDIA A100": (312e12, 2.0e12),
    "TPU v6 lite": (918e12, 1.64e12), "TPU v5 lite": (197e12, 0.82e12),
    "TPU v5": (459e12, 2.76e12), "TPU v4": (275e12, 1.2e12),
}

Progress = Callable[[str], None]


def nominal(kind: str) -> tuple[float | None, float | None]:
    """(peak FLOP/s, HBM bytes/s) of a device kind, (None, None) when not in the table."""
    for prefix, figures in sorted(NOMINAL.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return figures
    return None, None


def main(out: Path, small: bool | None = None, progress: Progress = print) -> dict:
    """Run the suite; write `out` (JSON) and return what it holds."""
    platform = jax.default_backend()
    small = platform == "cpu" if small is None else small
    kind = jax.devices()[0].device_kind
    peak_nominal, bw_nominal = nominal(kind)
    result = {"platform": platform, "device_kind": kind, "devices": jax.device_count(),
              "jax": jax.__version__, "small": small, "nominal_peak_flops_per_s": peak_nominal,
              "nominal_hbm_bytes_per_s": bw_nominal}
    t0 = time.perf_counter()
    progress("device: kernel parity")
    result["kernels"] = kernel_parity(platform, small)
    progress("device: matmul peak and HBM bandwidth")
    sizes = (256, 512) if small else (4096, 8192)
    result["peak_flops_per_s"] = _peak("bfloat16", sizes)[0]
    result["hbm_bytes_per_s"] = hbm_bandwidth(2**26 if small else 2**31)
    result["train"] = []
    for name, path, param_dtype, remats in (
            ("qwen2.5-1.5b shape", QWEN25_1_5B, "float32", ("dots_no_batch", "full")),
            ("qwen2.5-7b shape", QWEN25_7B, "bfloat16", ("dots_no_batch", "full"))):
        progress(f"device: training step, {name}")
        row = train_mfu(TINY if small else path, param_dtype, remats, 512 if small else 8192,
                        result["peak_flops_per_s"], peak_nominal)
        result["train"].append({"model": name, **row})
    result["time_to_first_step_s"] = result["train"][0]["time_to_first_step_s"]
    result["decode"] = []
    for batch in (1, 64):
        progress(f"device: decode, batch {batch}")
        result["decode"].append(decode_vs_bandwidth(TINY if small else QWEN25_1_5B, batch,
                                                    result["hbm_bytes_per_s"], small))
    result["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# 1. Kernel parity


def _packed_inputs(t: int, n: int, kh: int, h: int, dtype):
    """q, k, v [1, T, ...] and segments of a row of four documents of uneven lengths."""
    rng = np.random.default_rng(0)
    bounds = [0, t // 8 + 3, t // 2 - 5, (3 * t) // 4 + 1, t]
    seg = np.zeros((2, t), np.int32)
    for i in range(4):
        seg[:, bounds[i]:bounds[i + 1]] = i + 1
    seg[1, t - t // 8:] = 0  # the second row ends in padding
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, heads, h)), dtype)
               for heads in (n, kh, kh))
    return q, k, v, jnp.asarray(seg)


def kernel_parity(platform: str, small: bool) -> list[dict]:
    """One row per (path, dtype, packed): relative max error of the output and of dq, dk, dv
    against the dense float32 reference, and whether it is within the dtype's tolerance."""
    t, n, kh, h = (256, 8, 2, 64) if small else (4096, 12, 2, 128)
    interpret = platform == "cpu"
    cases = {"cpu": [("splash", jnp.float32, True), ("pallas_gpu", jnp.float32, True)],
             "gpu": [("pallas_gpu", jnp.bfloat16, True), ("pallas_gpu", jnp.float32, True),
                     ("cudnn", jnp.bfloat16, False)],
             "tpu": [("splash", jnp.bfloat16, True), ("splash", jnp.float32, True)]
             }.get(platform, [])
    accel = jnp.bfloat16 if platform != "cpu" else jnp.float32
    scale = h ** -0.5
    rows = []
    for path, dtype, packed in [*cases, ("blockwise", accel, True)]:
        q, k, v, seg = _packed_inputs(t, n, kh, h, dtype)
        if not packed:
            seg = jnp.ones_like(seg)
        real = np.asarray(seg) != 0

        def ours(q, k, v, path=path, seg=seg, packed=packed):
            if path == "blockwise":
                return blockwise_attention(q, k, v, _mask(seg), scale)
            if path == "cudnn":
                return cudnn_attention(q, k, v, scale)
            return fused_attention(path, q, k, v, seg if packed else None, scale,
                                   interpret=interpret)

        def reference(q, k, v, seg=seg):
            return dot_product_attention(q, k, v, _mask(seg).dense(), scale)

        try:
            got = _out_and_grads(ours, q, k, v, real)
            with jax.default_matmul_precision("highest"):
                want = _out_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)),
                                      real)
        except Exception as e:  # a kernel that does not build here is a result, not a crash
            rows.append({"path": path, "dtype": jnp.dtype(dtype).name, "packed": packed,
                         "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            continue
        errors = {name: _relative(g, w, real if name == "out" else None)
                  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
        tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # GPUs multiply float32 in TF32
        rows.append({"path": path + ("+interpret" if interpret and path != "blockwise" else ""),
                     "dtype": jnp.dtype(dtype).name, "packed": packed, "shape": [2, t, n, kh, h],
                     "max_relative_error": errors, "tolerance": tol,
                     "ok": all(e <= tol for e in errors.values())})
    return rows


def _mask(seg) -> MaskInfo:
    b, t = seg.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return MaskInfo(slots, slots, seg != 0, seg, seg)


def _out_and_grads(fn, q, k, v, real):
    weight = jnp.asarray(real, jnp.float32)[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)) * weight)

    out, grads = jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(
        q, k, v)
    return (out, *grads)


def _relative(got, want, rows=None) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if rows is not None:
        got, want = got[rows], want[rows]
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ---------------------------------------------------------------------------------------------
# 2. Training-step MFU, 4. time to first step


def packed_batch(vocab: int, seq_len: int, seed: int = 0) -> tuple[dict, float]:
    """One row of `seq_len` tokens packed with documents of 1/16 to 1/2 of a row (positions
    restarting), every position a target; and the row's mean attention context per token."""
    rng = np.random.default_rng(seed)
    lengths, left = [], seq_len
    while left:
        n = min(left, int(rng.integers(seq_len // 16, seq_len // 2 + 1)))
        lengths.append(n)
        left -= n
    seg = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)[None]
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])[None]
    ids = rng.integers(0, vocab, (1, seq_len + 1), dtype=np.int32)
    batch = {"tokens_bt": ids[:, :-1], "targets_bt": ids[:, 1:],
             "loss_mask_bt": np.ones((1, seq_len), bool), "segment_ids_bt": seg,
             "positions_bt": pos}
    context = sum(n * n for n in lengths) / seq_len  # dense_flops_per_token's causal seq_len
    return batch, context


def train_mfu(preset: Path, param_dtype: str, remats, seq_len: int, peak: float,
              peak_nominal: float | None, steps: int = 5) -> dict:
    """Median step time and MFU of the first remat policy in `remats` whose step fits."""
    _, cfg = _resolve(preset)
    cfg = cfg.model_copy(update={"param_dtype": param_dtype, "dtype": "bfloat16",
                                 "max_position_embeddings": max(seq_len,
                                                                cfg.max_position_embeddings)})
    batch, context = packed_batch(cfg.vocab_size, seq_len)
    notes = {}
    for policy in remats:
        t0 = time.perf_counter()
        fns, notes = _distill_steps(cfg, batch, (policy,), steps + 1, memory_share=0.9)
        if fns:
            break
    if not fns:
        return {"skipped": notes}
    (key, step), = fns.items()
    step()  # the first step: compiled above, run here
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    flops = dense_flops_per_token(cfg, context) * seq_len / step_s
    return {"setting": key[1], "param_dtype": param_dtype, "compute_dtype": "bfloat16",
            "tokens": seq_len, "documents": int(batch["segment_ids_bt"].max()),
            "step_s": step_s, "step_s_all": times, "tokens_per_s": seq_len / step_s,
            "flops_per_s": flops, "mfu_vs_measured_peak": flops / peak,
            "mfu_vs_nominal_peak": None if peak_nominal is None else flops / peak_nominal,
            "time_to_first_step_s": first, **notes.get(key, {})}


# ---------------------------------------------------------------------------------------------
# 3. Decode beside the bandwidth limit


def hbm_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Measured device-memory bytes/s: a jitted elementwise pass reading and writing `nbytes`."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 2 + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode_vs_bandwidth(preset: Path, batch: int, bandwidth: float, small: bool) -> dict:
    """Greedy decode tokens/s (steady state: the step time from n and 1 new tokens) of random
    bfloat16 weights, and the bandwidth limit of the same step."""
    _, cfg = _resolve(preset)
    cfg = cfg.model_copy(update={"param_dtype": "bfloat16", "dtype": "bfloat16"})
    model = init_model(cfg, seed=0)
    # small: enough steps that their time stands above the noise of a busy 2-core machine (32
    # steps of a tiny model once came out shorter than one step, a negative tokens/s)
    prompt, new = (32, 129) if small else (512, 65)
    engine = bench_engine(model, None, batch, prompt, new)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, prompt).tolist() for _ in range(batch)]

    def run(n):
        engine.generate(prompts, SamplingParams(max_new_tokens=n))

    timings = {}
    for n in (new, 1):
        run(n)  # warm-up: compilation
        timings[n] = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            run(n)
            timings[n] = min(timings[n], time.perf_counter() - t)
    # the engine decodes whole chunks of decode_steps: one token computes a chunk
    step_s = ((timings[new] - timings[1])
              / (decode_steps_computed(engine, new) - decode_steps_computed(engine, 1)))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    slots = prompt + new  # the cache a step reads: every slot of every row
    cache_bytes = (2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * slots
                   * cfg.head_size * 2)
    limit = batch * bandwidth / (weight_bytes + cache_bytes)
    achieved = batch / step_s
    return {"batch": batch, "prompt_tokens": prompt, "new_tokens": new, "step_ms": 1e3 * step_s,
            "tokens_per_s": achieved, "bandwidth_limit_tokens_per_s": limit,
            "limit_over_achieved": limit / achieved, "weight_bytes": weight_bytes,
            "cache_bytes": cache_bytes}


def table(result: dict) -> str:
    """Markdown of the suite's figures."""
    lines = [f"Device suite on {result['devices']} x {result['device_kind']} "
             f"({result['platform']}, {'small shapes' if result['small'] else 'full shapes'}); "
             f"bf16 matmul peak {result['peak_flops_per_s'] / 1e12:.2f} TFLOP/s measured, HBM "
             f"{result['hbm_bytes_per_s'] / 1e9:.0f} GB/s measured", "",
             "| kernel | dtype | packed | max rel. error (out, dq, dk, dv) | ok |",
             "|---|---|---|---|---|"]
    for r in result["kernels"]:
        errs = (", ".join(f"{e:.1e}" for e in r["max_relative_error"].values())
                if "max_relative_error" in r else r.get("error", ""))
        lines.append(f"| {r['path']} | {r['dtype']} | {r['packed']} | {errs} | {r['ok']} |")
    lines += ["", "| training step | setting | step s | tokens/s | MFU (measured peak) | "
              "MFU (nominal) | first step s |", "|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        if "step_s" not in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | | |")
            continue
        nom = "" if r["mfu_vs_nominal_peak"] is None else f"{100 * r['mfu_vs_nominal_peak']:.1f}%"
        lines.append(f"| {r['model']} ({r['param_dtype']} params) | {r['setting']} | "
                     f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu_vs_measured_peak']:.1f}% | {nom} | "
                     f"{r['time_to_first_step_s']:.1f} |")
    lines += ["", "| decode | step ms | tokens/s | bandwidth limit tokens/s | limit / achieved |",
              "|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| batch {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['bandwidth_limit_tokens_per_s']:.1f} | "
                     f"{r['limit_over_achieved']:.2f}x |")
    return "\n".join(lines)
