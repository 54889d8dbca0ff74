"""`distill bench --suite engine`: the inference engine's targets (issue 28), side by side in one
run on one warmed engine (SmolLM2-135M by default):

1. utilisation (tokens delivered / slot-steps computed) of `requests` requests with mixed budgets
   and sampling settings submitted at once, beside a static-batching baseline: the same requests
   `slots` at a time, each group run to idle before the next (what `sampling.generate` did); and
   with `requests` clients sustained (each sends its next request as its last ends);
2. a sampled decode step (temperature 0.6, top-p 0.95) against a greedy one, every slot busy;
3. time to first token at concurrency <= slots against one prompt chunk plus one decode chunk;
4. compiles after `warmup()` across temperatures, seeds, `n`, `max_tokens` and prompt lengths up
   to the engine's limit;
5. `set_weights` three times: compiles added and seconds against one decode step.

The engine has no end-of-sequence ids here, so every sample runs to its own budget and both
sides of a comparison compute the same tokens.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import distill
from distill.chat import prompt_ids
from distill.inference import Engine, EngineConfig, EngineError, compiles, programs
from distill.sampling import SamplingParams

TOPICS = ("a robot who learns to paint", "the sea", "a city at night", "an old clock",
          "two friends who argue about chess and then make up over dinner", "rain",
          "a long journey across a desert with a camel that will not stop talking")
# (temperature, top_p, top_k): the clients' settings, each its own
MIXED = ((0.0, 1.0, 0), (0.6, 0.95, 0), (0.7, 0.9, 0), (1.0, 1.0, 40), (0.3, 0.8, 20),
         (0.9, 0.95, 50))
TARGETS = {"utilisation": 0.85, "sampled_over_greedy": 1.15, "compiles_after_warmup": 0,
           "set_weights_over_decode_step": 1.0, "ttft_over_chunk_plus_decode": 1.0}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """The suite's sizes: `requests` mixed requests over `slots` slots with budgets drawn from
    `budgets`; `max_len` tokens per sequence (the compile sweep reaches it); `sweep` requests in
    the compile sweep, `max_tokens` its largest budget; `visits` timed decode visits a side;
    `prefill_chunk` and `min_window` the engine's (smaller: fewer programs, a quicker test)."""

    requests: int = 64
    slots: int = 16
    budgets: tuple[int, int] = (16, 64)
    max_len: int = 512
    sweep: int = 20
    max_tokens: int = 256
    visits: int = 4
    seed: int = 0
    prefill_chunk: int = 256
    min_window: int = 128


def bench_engine(model, tokenizer, rows: int, prompt_tokens: int, new_tokens: int) -> Engine:
    """An engine of `rows` slots for prompts up to `prompt_tokens` and `new_tokens` more, with
    no end-of-sequence ids (every row runs to its budget) and a prefill budget that writes every
    prompt in the first host visit, as a static batch's prefill does."""
    return Engine(model, tokenizer, EngineConfig(
        slots=rows, max_len=prompt_tokens + new_tokens,
        prefill_budget=max(16, rows * prompt_tokens)), eos_ids=())


def decode_steps_computed(engine: Engine, new_tokens: int) -> int:
    """Decode steps the engine runs for `new_tokens` tokens: whole chunks of `decode_steps`."""
    k = engine.config.decode_steps
    return -(-new_tokens // k) * k


def main(model_path: Path, out: Path | None, settings: Settings = Settings(),
         progress: Progress = print) -> dict:
    """Run the suite on the model at `model_path`; write `out` (JSON) and return what it holds."""
    s, t0 = settings, time.perf_counter()
    model, tok = distill.load_pretrained(model_path)
    eng = Engine(model, tok, EngineConfig(slots=s.slots, max_len=s.max_len,
                                          prefill_chunk=s.prefill_chunk,
                                          min_window=s.min_window), eos_ids=())
    result = {"model": str(model_path), "platform": jax.default_backend(),
              "settings": asdict(s), "engine": eng.config.model_dump(), "targets": TARGETS}
    progress("engine: warmup")
    before, t = compiles(), time.perf_counter()
    result["warmup"] = {"programs": eng.warmup(), "seconds": time.perf_counter() - t,
                        "compiles": compiles() - before}
    progress(f"engine: warmup {result['warmup']['seconds']:.0f} s; {s.requests} mixed requests, "
             "continuous vs static batching")
    counted = {}  # compiles per section after warmup

    def section(name, fn):
        c = compiles()
        result[name] = fn()
        counted[name] = compiles() - c

    section("batching", lambda: batching(eng, mixed_requests(eng, tok, s)))
    progress(f"engine: {s.requests} clients sustained, {2 * s.requests} requests")
    section("sustained", lambda: sustained(eng, mixed_requests(eng, tok, s), 2 * s.requests))
    progress("engine: sampled vs greedy decode step")
    section("step", lambda: step_cost(eng, tok, s.visits))
    progress("engine: time to first token")
    section("ttft", lambda: [ttft(eng, tok, c, result["step"]["greedy_visit_s"])
                             for c in sorted({1, max(s.slots // 4, 1), s.slots})])
    progress("engine: compile sweep")
    section("sweep", lambda: compile_sweep(eng, s))
    progress("engine: set_weights")
    section("set_weights", lambda: set_weights_cost(eng, model, result["step"]["greedy_step_s"]))
    result["compiles_by_section"] = counted
    result["compiles_after_warmup"] = sum(counted.values())
    result["programs"] = len(eng.programs)
    result["wall_s"] = time.perf_counter() - t0
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _prompt(tok, i: int, length: int | None = None) -> list[int]:
    """A chat prompt (about 30-60 tokens) or, without a tokenizer or with `length`, ids of that
    length (random, but the same for the same i)."""
    if tok is not None and length is None:
        return prompt_ids(tok, f"Write a short story about {TOPICS[i % len(TOPICS)]}.")
    rng = np.random.default_rng(i)
    return rng.integers(3, 300, length or 20 + 7 * (i % 7)).tolist()


def mixed_requests(eng: Engine, tok, s: Settings) -> list[tuple[list[int], SamplingParams]]:
    """`s.requests` (prompt ids, settings): budgets uniform in `s.budgets`, settings cycling
    through MIXED, each with its own seed."""
    rng = np.random.default_rng(s.seed)
    reqs = []
    for i in range(s.requests):
        temperature, top_p, top_k = MIXED[i % len(MIXED)]
        budget = int(rng.integers(s.budgets[0], s.budgets[1] + 1))
        reqs.append((_prompt(tok, i), SamplingParams(
            max_new_tokens=budget, temperature=temperature, top_p=top_p, top_k=top_k, seed=i)))
    return reqs


def _run(eng: Engine, reqs, group: int) -> dict:
    """Submit `reqs` `group` at a time, each group run to idle; figures of the whole run."""
    steps, delivered, visits = eng.slot_steps, eng.tokens_delivered, eng.visits
    t = time.perf_counter()
    tokens = []
    for g in range(0, len(reqs), group):
        handles = [eng.submit(ids, p) for ids, p in reqs[g:g + group]]
        eng.run_until_idle()
        tokens += [h.tokens for h in handles]
    seconds = time.perf_counter() - t
    delivered = eng.tokens_delivered - delivered
    steps = eng.slot_steps - steps
    return {"seconds": seconds, "tokens": delivered, "tokens_per_s": delivered / seconds,
            "slot_steps": steps, "utilisation": delivered / steps,
            "visits": eng.visits - visits, "_tokens": tokens}


def batching(eng: Engine, reqs) -> dict:
    """Continuous batching (every request submitted at once) against static batching (a slots'
    worth at a time), on the same requests; their seeded tokens must agree."""
    continuous = _run(eng, reqs, len(reqs))
    static = _run(eng, reqs, eng.config.slots)
    same = continuous.pop("_tokens") == static.pop("_tokens")
    budgets = [p.max_new_tokens for _, p in reqs]
    k = eng.config.decode_steps
    return {"requests": len(reqs), "budgets": budgets,
            # what a slot computes past its budget in its last chunk of k steps bounds utilisation
            # even with no idle slot ever: sum(budget) / sum(budget rounded up to k)
            "chunk_bound": sum(budgets) / sum(-(-b // k) * k for b in budgets),
            "continuous": continuous, "static": static,
            "tokens_per_s_ratio": continuous["tokens_per_s"] / static["tokens_per_s"],
            "utilisation_ratio": continuous["utilisation"] / static["utilisation"],
            "same_tokens": same}


def sustained(eng: Engine, reqs, total: int) -> dict:
    """`len(reqs)` clients, each sending its next request when its last one ends (the soak's
    load), `total` requests in all (drawn from `reqs` in turn): utilisation while every client
    still has one to send (the steady state) and over the whole run, drain included."""
    sent, steady = [0], {}
    start = {"steps": eng.slot_steps, "tokens": eng.tokens_delivered, "t": time.perf_counter()}

    def send(_done=None):
        if sent[0] < total:
            ids, p = reqs[sent[0] % len(reqs)]
            sent[0] += 1
            eng.submit(ids, p, on_done=send)
        elif not steady:  # the first client with nothing left to send: the drain begins
            steady.update(steps=eng.slot_steps, tokens=eng.tokens_delivered)

    for _ in reqs:
        send()
    eng.run_until_idle()
    seconds = time.perf_counter() - start["t"]
    tokens, steps = (eng.tokens_delivered - start["tokens"], eng.slot_steps - start["steps"])
    return {"clients": len(reqs), "requests": total, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "utilisation": tokens / steps,
            "utilisation_steady": ((steady["tokens"] - start["tokens"])
                                   / (steady["steps"] - start["steps"]))}


def _visit_times(eng: Engine, tok, params: SamplingParams, visits: int) -> list[float]:
    """Seconds of `visits` host visits with every slot decoding (after the admitting one)."""
    k = eng.config.decode_steps
    params = params.model_copy(update={"max_new_tokens": k * (visits + 4)})
    reqs = [eng.submit(_prompt(tok, i), params.model_copy(update={"seed": i}))
            for i in range(eng.config.slots)]
    while not eng.host.active.all():  # admit, prefill (a budget a visit), first chunks
        eng.step()
    times = []
    for _ in range(visits):
        assert eng.host.active.all(), "a slot stopped early"
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    for r in reqs:
        r.cancel()
    eng.run_until_idle()
    return times


def step_cost(eng: Engine, tok, visits: int, rounds: int = 2) -> dict:
    """Seconds per decode step, greedy and sampled (temperature 0.6, top-p 0.95), every slot
    busy: the median visit over `decode_steps`, sides alternated, the better round kept."""
    sides = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.6, top_p=0.95)}
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, params in sides.items():
            best[name] = min(best[name], statistics.median(_visit_times(eng, tok, params, visits)))
    k = eng.config.decode_steps
    return {"slots": eng.config.slots, "decode_steps": k, "greedy_visit_s": best["greedy"],
            "sampled_visit_s": best["sampled"], "greedy_step_s": best["greedy"] / k,
            "sampled_step_s": best["sampled"] / k,
            "sampled_over_greedy": best["sampled"] / best["greedy"]}


def prefill_chunk_s(eng: Engine, length: int, repeats: int = 3) -> float:
    """Seconds of one prompt's first chunk of `length` tokens (at most the largest chunk; its
    bucket) into a slot of an idle engine: the program a lone prompt's prefill runs."""
    length = min(length, eng.chunks[-1])
    c = next(c for c in eng.chunks if c >= length)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        eng.cache = programs.prefill_first(
            eng.graphdef, eng.weights, eng.cache, jnp.asarray(np.zeros(1, np.int32)),
            jnp.asarray(np.zeros((1, c), np.int32)), jnp.asarray(np.full(1, length, np.int32)),
            layout=eng.layout)
        jax.block_until_ready(eng.cache)
        best = min(best, time.perf_counter() - t)
    return best


def ttft(eng: Engine, tok, concurrency: int, decode_chunk_s: float) -> dict:
    """`concurrency` requests submitted at once to an idle engine: seconds from submit to each
    one's first token, against its prompt's chunks (one, for a prompt up to `prefill_chunk`)
    plus one decode chunk."""
    first: dict[int, float] = {}

    def on_delta(req, _sample, _new):
        first.setdefault(req.id, time.perf_counter())

    prompts = [_prompt(tok, i) for i in range(concurrency)]
    t = time.perf_counter()
    reqs = [eng.submit(ids, SamplingParams(max_new_tokens=eng.config.decode_steps, seed=i),
                       on_delta=on_delta) for i, ids in enumerate(prompts)]
    eng.run_until_idle()
    waits = sorted(first[r.id] - t for r in reqs)
    longest = max(len(p) for p in prompts) - 1  # the last prompt token is the first decode's
    chunks = -(-longest // eng.chunks[-1])
    chunk = prefill_chunk_s(eng, longest)
    return {"concurrency": concurrency, "prompt_tokens": longest + 1, "prompt_chunks": chunks,
            "ttft_p50_s": statistics.median(waits), "ttft_max_s": waits[-1],
            "prefill_chunk_s": chunk, "decode_chunk_s": decode_chunk_s,
            "ttft_over_chunk_plus_decode": waits[-1] / (chunks * chunk + decode_chunk_s)}


def sweep_requests(s: Settings) -> list[tuple[list[int], SamplingParams]]:
    """Temperatures 0.05-1.0 in steps of 0.05, seeds 0-9, n 1-4, budgets 1 to `s.max_tokens` and
    prompt lengths from 1 to what the limit leaves (some exactly at it), with top-p, top-k and
    log-probabilities varied too."""
    budgets = sorted({min(b, s.max_tokens)
                      for b in (1, 2, 3, 8, 9, 17, 31, 64, s.max_tokens // 2, s.max_tokens)})
    lengths = (1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, s.max_len)
    reqs = []
    for i in range(max(s.sweep, 20)):
        budget = min(budgets[i % len(budgets)], s.max_len - 1)
        length = min(lengths[i % len(lengths)], s.max_len - budget)
        reqs.append((_prompt(None, 1000 + i, length), SamplingParams(
            temperature=round(0.05 * (1 + i % 20), 2), seed=i % 10, n=1 + i % 4,
            max_new_tokens=budget, top_p=(1.0, 0.95, 0.5)[i % 3], top_k=(0, 1, 7, 50)[i % 4],
            logprobs=(0, 0, 1, 5, 20)[i % 5])))
    return reqs


def compile_sweep(eng: Engine, s: Settings) -> dict:
    """Run the sweep's requests (all at once) and count what they compiled; a prompt past the
    limit is refused without compiling."""
    reqs = sweep_requests(s)
    before, t = compiles(), time.perf_counter()
    handles = [eng.submit(ids, p) for ids, p in reqs]
    eng.run_until_idle()
    refused = 0
    for budget in (1, s.max_tokens):
        try:
            eng.check(eng.max_len - budget + 1, SamplingParams(max_new_tokens=budget))
        except EngineError:
            refused += 1
    temps = sorted({p.temperature for _, p in reqs})
    return {"requests": len(reqs), "samples": sum(p.n for _, p in reqs),
            "tokens": sum(len(x) for h in handles for x in h.tokens),
            "temperatures": [temps[0], temps[-1], len(temps)],
            "seeds": len({p.seed for _, p in reqs}), "n": sorted({p.n for _, p in reqs}),
            "max_tokens": [min(p.max_new_tokens for _, p in reqs),
                           max(p.max_new_tokens for _, p in reqs)],
            "prompt_tokens": [min(len(i) for i, _ in reqs), max(len(i) for i, _ in reqs)],
            "longest_sequence": max(len(i) + p.max_new_tokens for i, p in reqs),
            "max_len": eng.max_len, "past_limit_refused": refused,
            "seconds": time.perf_counter() - t, "compiles": compiles() - before,
            "programs": len(eng.programs)}


def set_weights_cost(eng: Engine, model, decode_step_s: float, times: int = 3) -> dict:
    """`set_weights` `times` times with new arrays of the same shapes (then one decode visit on
    them): compiles added and the seconds of each against one decode step."""
    state = nnx.state(model)
    seconds, swap_compiles = [], 0
    for k in range(times):  # new arrays made on the host: nothing compiled, nothing timed
        new = jax.tree.map(lambda x, k=k: jax.device_put(
            np.asarray(x) * np.asarray(1 + 1e-3 * (k + 1), x.dtype), x.sharding), state)
        jax.block_until_ready(new)
        c, t = compiles(), time.perf_counter()
        eng.set_weights(new)
        jax.block_until_ready(eng.weights)
        seconds.append(time.perf_counter() - t)
        swap_compiles += compiles() - c
    c = compiles()
    eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=eng.config.decode_steps))
    decoding = compiles() - c
    eng.set_weights(state)
    return {"times": times, "seconds": seconds, "decode_step_s": decode_step_s,
            "max_over_decode_step": max(seconds) / decode_step_s,
            "compiles": swap_compiles, "compiles_decoding_after": decoding}


def table(r: dict) -> str:
    """Markdown of the suite's figures, each beside its target."""
    b, st, sw, w = r["batching"], r["step"], r["sweep"], r["set_weights"]
    c, s = b["continuous"], b["static"]
    rows = [
        (f"utilisation, {b['requests']} requests at once (drain included)", f"{c['utilisation']:.3f}",
         ">= 0.85", c["utilisation"] >= TARGETS["utilisation"]),
        (f"utilisation, {r['sustained']['clients']} clients sustained: steady / with drain",
         f"{r['sustained']['utilisation_steady']:.3f} / {r['sustained']['utilisation']:.3f} "
         f"({r['sustained']['tokens_per_s']:.1f} tok/s)", ">= 0.85",
         r["sustained"]["utilisation_steady"] >= TARGETS["utilisation"]),
        ("utilisation bound of whole decode chunks", f"{b['chunk_bound']:.3f}", "", None),
        ("static batching: utilisation", f"{s['utilisation']:.3f} (continuous "
         f"{b['utilisation_ratio']:.2f}x)", "", None),
        ("tokens/s continuous / static", f"{c['tokens_per_s']:.1f} / {s['tokens_per_s']:.1f} = "
         f"{b['tokens_per_s_ratio']:.2f}x (same tokens: {b['same_tokens']})", "", None),
        ("sampled / greedy decode step", f"{1e3 * st['sampled_step_s']:.1f} / "
         f"{1e3 * st['greedy_step_s']:.1f} ms = {st['sampled_over_greedy']:.2f}x", "<= 1.15",
         st["sampled_over_greedy"] <= TARGETS["sampled_over_greedy"]),
    ]
    for t in r["ttft"]:
        rows.append((f"TTFT at concurrency {t['concurrency']} (p50 / max)",
                     f"{t['ttft_p50_s']:.2f} / {t['ttft_max_s']:.2f} s vs chunk "
                     f"{t['prefill_chunk_s']:.2f} + decode chunk {t['decode_chunk_s']:.2f} s = "
                     f"{t['ttft_over_chunk_plus_decode']:.2f}x", "<= 1x",
                     t["ttft_over_chunk_plus_decode"] <= TARGETS["ttft_over_chunk_plus_decode"]))
    rows += [
        ("compiles after warmup (sweep)", f"{sw['compiles']} over {sw['requests']} requests, "
         f"{sw['samples']} samples, prompts {sw['prompt_tokens'][0]}-{sw['prompt_tokens'][1]}, "
         f"max_tokens {sw['max_tokens'][0]}-{sw['max_tokens'][1]}", "0", sw["compiles"] == 0),
        ("programs / warmup", f"{r['warmup']['programs']} / {r['warmup']['seconds']:.1f} s",
         "", None),
        ("set_weights x3: compiles", f"{w['compiles']} (decode after: "
         f"{w['compiles_decoding_after']})", "0", w["compiles"] + w["compiles_decoding_after"] == 0),
        ("set_weights / decode step", ", ".join(f"{1e3 * x:.1f}" for x in w["seconds"]) +
         f" ms vs {1e3 * w['decode_step_s']:.1f} ms = {w['max_over_decode_step']:.2f}x", "<= 1x",
         w["max_over_decode_step"] <= TARGETS["set_weights_over_decode_step"]),
        ("compiles after warmup (whole run)", str(r["compiles_after_warmup"]), "0",
         r["compiles_after_warmup"] == 0),
    ]
    lines = [f"Engine suite: {r['model']} on {r['platform']}, {r['engine']['slots']} slots, "
             f"max_len {r['settings']['max_len']}", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {m} | {t} | {'' if ok is None else ('yes' if ok else 'NO')} |"
              for a, m, t, ok in rows]
    return "\n".join(lines)
