"""Side-by-side benchmarks: distill and transformers + PyTorch in the same run, as ratios.

The machines this runs on are shared and noisy, so each figure is taken right next to its
reference and reported as a ratio; every timed call is preceded by a warm-up call (compilation,
allocator warm-up) that is not counted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PROMPT = "Write a short story about a robot who learns to paint."


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up: compile / first-call costs are not counted
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_decode(gguf: Path, batch_sizes=(1, 16), new_tokens: int = 64, repeats: int = 2) -> list[dict]:
    """Greedy decode tokens/s of distill vs transformers `generate` on the same SmolLM2 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    import distill
    from distill.sampling import SamplingParams, generate
    from distill.textgen import prompt_ids

    model, tok = distill.load_pretrained(gguf)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ids = prompt_ids(tok, PROMPT)
    params = SamplingParams(max_new_tokens=new_tokens)
    rows = []
    for b in batch_sizes:
        def ours(b=b):
            out = generate(model, [ids] * b, params)  # no EOS: always new_tokens tokens
            assert all(len(o.token_ids) == new_tokens for o in out)

        def theirs(b=b):
            with torch.no_grad():
                ref.generate(torch.tensor([ids] * b), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)

        t_ours, t_theirs = _best_of(ours, repeats), _best_of(theirs, repeats)
        rows.append({"benchmark": "decode", "model": "SmolLM2-135M-Instruct", "batch": b,
                     "prompt_tokens": len(ids), "new_tokens": new_tokens,
                     "distill_tokens_per_s": b * new_tokens / t_ours,
                     "transformers_tokens_per_s": b * new_tokens / t_theirs,
                     "speedup": t_theirs / t_ours})
    return rows


def bench_moe_experts(tokens=(1, 2048)) -> list[dict]:
    """MoE layer time per token with 8 vs 64 routed experts (same top-k and expert width), on the
    dispatch path this backend picks; targets: growth <= 1.3x decoding, <= 1.5x for a prefill."""
    from distill.bench_moe import run
    from distill.models.experts import resolve_dispatch

    rows = run(tokens=tokens, num_experts=(8, 64), paths=(resolve_dispatch("auto"),))
    return [dict(r, benchmark="moe_experts") for r in rows]


def bench_generate(gguf: Path, prompts: int = 16, n: int = 4, new_tokens: int = 64) -> list[dict]:
    """Trace-generation throughput: generated tokens/s of the in-process backend (sampling at
    temperature 0.6, top-p 0.95, `n` samples a prompt, top-5 log-probabilities recorded) for the
    tiny MoE teacher and for SmolLM2-135M; and completed requests/s of the HTTP backend against
    `distill serve` (SmolLM2) on 127.0.0.1."""
    import numpy as np

    import distill
    from distill.sampling import SamplingParams, generate
    from distill.serve import ServerThread, build_app
    from distill.textgen import prompt_ids
    from distill.traces.http_teacher import bench_http

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.6, top_p=0.95, n=n,
                            logprobs=5)
    rows = []
    preset = Path(__file__).resolve().parents[1] / "configs" / "teachers" / "tiny-moe.yaml"
    cases = [("tiny-moe (random)", preset), ("SmolLM2-135M-Instruct", gguf)]
    for name, path in cases:
        model, tok = distill.load_pretrained(path)
        if tok is not None:
            ids = [prompt_ids(tok, f"{PROMPT} ({i})") for i in range(prompts)]
        else:  # the preset has no tokenizer: random prompts of a typical length
            rng = np.random.default_rng(0)
            ids = [rng.integers(3, model.config.vocab_size, 40).tolist() for _ in range(prompts)]

        def run(model=model, ids=ids):
            out = generate(model, ids, params)  # no EOS ids: every row runs to new_tokens
            return sum(len(o.token_ids) for o in out)

        tokens = run()
        seconds = _best_of(run, 1)
        rows.append({"benchmark": "generate_jax", "model": name, "prompts": prompts, "n": n,
                     "new_tokens": new_tokens, "tokens_per_s": tokens / seconds})
    model, tok = distill.load_pretrained(gguf)
    with ServerThread(build_app(model, tok, "smollm2", max_batch=16)) as url:
        bench_http(f"{url}/v1", "smollm2", requests=16, concurrency=16, max_new_tokens=new_tokens)
        r = bench_http(f"{url}/v1", "smollm2", requests=64, concurrency=16,
                       max_new_tokens=new_tokens)
    rows.append({"benchmark": "generate_http", "model": "SmolLM2-135M-Instruct via distill serve",
                 **r})
    return rows


def report(decode: list[dict], moe: list[dict], out: Path | None, generate: list[dict] = (),
           train: list[dict] = ()) -> str:
    """Markdown tables of the rows (and one JSON file when `out` is given)."""
    lines = ["| benchmark | batch | distill tok/s | transformers tok/s | ratio |", "|---|---|---|---|---|"]
    for r in decode:
        lines.append(f"| {r['benchmark']} | {r['batch']} | {r['distill_tokens_per_s']:.1f} | "
                     f"{r['transformers_tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
    lines += ["", "| MoE layer | tokens | dispatch | experts | us/token | vs 8 experts |",
              "|---|---|---|---|---|---|"]
    for r in moe:
        lines.append(f"| routed experts | {r['tokens']} | {r['path']} | {r['experts']} | "
                     f"{r['us_per_token']:.1f} | {r['ratio']:.2f}x |")
    if generate:
        lines += ["", "| trace generation | model | throughput |", "|---|---|---|"]
        for r in generate:
            value = (f"{r['tokens_per_s']:.1f} generated tok/s (batch {r['prompts']} x n {r['n']})"
                     if r["benchmark"] == "generate_jax" else
                     f"{r['requests_per_s']:.1f} requests/s, {r['completion_tokens_per_s']:.1f} "
                     f"tok/s (concurrency {r['concurrency']})")
            lines.append(f"| {r['benchmark']} | {r['model']} | {value} |")
    if train:
        from distill.bench_train import train_table

        lines += ["", *train_table(train)]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(decode + moe + list(generate) + list(train), indent=2) + "\n")
    return "\n".join(lines)


def main(gguf: Path, out: Path | None) -> str:
    """Run every benchmark that exists and return the tables."""
    from distill.bench_train import bench_train, bench_train_gpu_preset

    return report(bench_decode(gguf), bench_moe_experts(), out, bench_generate(gguf),
                  bench_train(batch=4) + bench_train_gpu_preset())
