"""Side-by-side benchmarks: distill and transformers + PyTorch in the same run, as ratios.

The machines this runs on are shared and noisy, so each figure is taken right next to its
reference and reported as a ratio; every timed call is preceded by a warm-up call (compilation,
allocator warm-up) that is not counted.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import distill
from distill.backends.http import bench_http
from distill.bench.engine import bench_engine, decode_steps_computed
from distill.bench.moe import run
from distill.chat import prompt_ids
from distill.models.deepseek.experts import resolve_dispatch
from distill.sampling import SamplingParams
from distill.serve.app import ServerThread, build_app

PROMPT = "Write a short story about a robot who learns to paint."


PRESETS = {"tiny-moe": Path(__file__).resolve().parents[2] / "configs" / "teachers" / "tiny-moe.yaml"}


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: compile / first-call costs are not counted
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_matmul_ms(cfg, batch: int, repeats: int = 3) -> float:
    """Milliseconds of the matrix products of one decode step of a dense model alone, on XLA:
    `batch` rows through every layer's q, k, v, o, gate, up and down projections (separate
    per-layer weights, as the CPU decode path holds them) and the output head. It is a floor
    for a decode step on this machine, whatever the rest of the engine does."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH = cfg.num_attention_heads * cfg.head_size, cfg.num_key_value_heads * cfg.head_size
    shapes = [(D, NH), (D, KH), (D, KH), (NH, D), (D, F), (D, F), (F, D)]
    keys = iter(jax.random.split(jax.random.key(0), len(shapes) * cfg.num_hidden_layers + 1))
    weights = [[0.02 * jax.random.normal(next(keys), s) for s in shapes]
               for _ in range(cfg.num_hidden_layers)]
    head_vd = 0.02 * jax.random.normal(next(keys), (V, D))

    @jax.jit
    def step(x_bd, weights, head_vd):
        for wq, wk, wv, wo, wg, wu, wd in weights:
            q = x_bd @ wq
            x_bd = x_bd + (q + jnp.tile(x_bd @ wk + x_bd @ wv, NH // KH)) @ wo
            x_bd = x_bd + (jax.nn.silu(x_bd @ wg) * (x_bd @ wu)) @ wd
        return x_bd @ head_vd.T

    x = jnp.ones((batch, D))
    return 1e3 * _best_of(lambda: jax.block_until_ready(step(x, weights, head_vd)), repeats)


def bench_decode(gguf: Path, batch_sizes=(1, 16), new_tokens: int = 64, repeats: int = 2) -> list[dict]:
    """Greedy decode tokens/s of distill vs transformers `generate` on the same SmolLM2 weights.

    Ours is the inference engine with one slot a row. Both are timed end to end (prefill
    included), and with one new token, which gives each side's prefill and its time per decode
    step (the engine decodes whole chunks of `decode_steps`, so one token computes a chunk). `matmul_floor_ms` is `decode_matmul_ms`: what
    the step's matrix products alone take here, so `best_ratio` is the largest end-to-end ratio
    reachable with these matrix products (our prefill plus that floor per step)."""
    import torch  # the hf extra: imported only where the reference side runs
    from transformers import AutoModelForCausalLM

    model, tok = distill.load_pretrained(gguf)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ids = prompt_ids(tok, PROMPT)
    rows = []
    for b in batch_sizes:
        engine = bench_engine(model, tok, b, len(ids), new_tokens)

        def ours(n, b=b, engine=engine):
            out = engine.generate([ids] * b, SamplingParams(max_new_tokens=n))
            assert all(len(o.token_ids) == n for o in out)

        def theirs(n, b=b):
            with torch.no_grad():
                ref.generate(torch.tensor([ids] * b), attention_mask=torch.ones(b, len(ids)),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)

        t = {(side, n): _best_of(lambda f=f, n=n: f(n), repeats)
             for n in (new_tokens, 1) for side, f in (("ours", ours), ("theirs", theirs))}
        # the engine decodes whole chunks: one token costs a chunk, new_tokens a few
        computed = {"ours": [decode_steps_computed(engine, n) for n in (new_tokens, 1)],
                    "theirs": [new_tokens, 1]}
        step = {side: (t[side, new_tokens] - t[side, 1]) / (c[0] - c[1])
                for side, c in computed.items()}
        prefill = {"ours": t["ours", 1] - (computed["ours"][1] - 1) * step["ours"],
                   "theirs": t["theirs", 1]}  # the prompt plus one step, both sides
        floor = decode_matmul_ms(model.config, b) / 1e3
        rows.append({"benchmark": "decode", "model": "SmolLM2-135M-Instruct", "batch": b,
                     "prompt_tokens": len(ids), "new_tokens": new_tokens,
                     "distill_tokens_per_s": b * new_tokens / t["ours", new_tokens],
                     "transformers_tokens_per_s": b * new_tokens / t["theirs", new_tokens],
                     "speedup": t["theirs", new_tokens] / t["ours", new_tokens],
                     "distill_prefill_ms": 1e3 * prefill["ours"],
                     "transformers_prefill_ms": 1e3 * prefill["theirs"],
                     "distill_step_ms": 1e3 * step["ours"],
                     "transformers_step_ms": 1e3 * step["theirs"],
                     "matmul_floor_ms": 1e3 * floor,
                     "best_ratio": t["theirs", new_tokens] / (prefill["ours"]
                                                              + (new_tokens - 1) * floor)})
    return rows


def bench_moe_experts(tokens=(1, 2048)) -> list[dict]:
    """MoE layer time per token with 8 vs 64 routed experts (same top-k and expert width), on the
    dispatch path this backend picks; targets: growth <= 1.3x decoding, <= 1.5x for a prefill."""
    rows = run(tokens=tokens, num_experts=(8, 64), paths=(resolve_dispatch("auto"),))
    return [dict(r, benchmark="moe_experts") for r in rows]


def bench_generate(gguf: Path, prompts: int = 16, n: int = 4, new_tokens: int = 64) -> list[dict]:
    """Trace-generation throughput: generated tokens/s of the in-process backend (sampling at
    temperature 0.6, top-p 0.95, `n` samples a prompt, top-5 log-probabilities recorded) for the
    tiny MoE teacher and for SmolLM2-135M; and completed requests/s of the HTTP backend against
    `distill serve` (SmolLM2) on 127.0.0.1."""

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95, n=n,
                            logprobs=5)
    rows = []
    cases = [("tiny-moe (random)", PRESETS["tiny-moe"]), ("SmolLM2-135M-Instruct", gguf)]
    for name, path in cases:
        model, tok = distill.load_pretrained(path)
        if tok is not None:
            ids = [prompt_ids(tok, f"{PROMPT} ({i})") for i in range(prompts)]
        else:  # the preset has no tokenizer: random prompts of a typical length
            rng = np.random.default_rng(0)
            ids = [rng.integers(3, model.config.vocab_size, 40).tolist() for _ in range(prompts)]

        engine = bench_engine(model, tok, prompts * n, max(map(len, ids)), new_tokens)

        def run(engine=engine, ids=ids):
            out = engine.generate(ids, params)  # no EOS ids: every row runs to new_tokens
            return sum(len(o.token_ids) for o in out)

        tokens = run()
        seconds = _best_of(run, 1)
        rows.append({"benchmark": "generate_jax", "model": name, "prompts": prompts, "n": n,
                     "new_tokens": new_tokens, "tokens_per_s": tokens / seconds})
    model, tok = distill.load_pretrained(gguf)
    with ServerThread(build_app(model, tok, "smollm2")) as url:
        bench_http(f"{url}/v1", "smollm2", requests=16, concurrency=16, max_new_tokens=new_tokens)
        r = bench_http(f"{url}/v1", "smollm2", requests=64, concurrency=16,
                       max_new_tokens=new_tokens)
    rows.append({"benchmark": "generate_http", "model": "SmolLM2-135M-Instruct via distill serve",
                 **r})
    return rows


def decode_table(decode: list[dict]) -> list[str]:
    """Markdown lines of the decode rows."""
    lines = ["| benchmark | batch | distill tok/s | transformers tok/s | ratio | prefill ms "
             "(distill / transformers) | step ms (distill / transformers / matmuls alone) | "
             "ratio reachable with these matmuls |", "|---|---|---|---|---|---|---|---|"]
    for r in decode:
        lines.append(f"| {r['benchmark']} | {r['batch']} | {r['distill_tokens_per_s']:.1f} | "
                     f"{r['transformers_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['distill_prefill_ms']:.0f} / {r['transformers_prefill_ms']:.0f} | "
                     f"{r['distill_step_ms']:.1f} / {r['transformers_step_ms']:.1f} / "
                     f"{r['matmul_floor_ms']:.1f} | {r['best_ratio']:.2f}x |")
    return lines


def moe_table(moe: list[dict]) -> list[str]:
    """Markdown lines of the MoE-layer rows."""
    lines = ["| MoE layer | tokens | dispatch | experts | us/token | vs 8 experts |",
             "|---|---|---|---|---|---|"]
    for r in moe:
        lines.append(f"| routed experts | {r['tokens']} | {r['path']} | {r['experts']} | "
                     f"{r['us_per_token']:.1f} | {r['ratio']:.2f}x |")
    return lines


def generate_table(generate: list[dict]) -> list[str]:
    """Markdown lines of the trace-generation rows."""
    lines = ["| trace generation | model | throughput |", "|---|---|---|"]
    for r in generate:
        value = (f"{r['tokens_per_s']:.1f} generated tok/s (batch {r['prompts']} x n {r['n']})"
                 if r["benchmark"] == "generate_jax" else
                 f"{r['requests_per_s']:.1f} requests/s, {r['completion_tokens_per_s']:.1f} "
                 f"tok/s (concurrency {r['concurrency']})")
        lines.append(f"| {r['benchmark']} | {r['model']} | {value} |")
    return lines
