"""`distill bench data`: the training-data pipeline at R1 scale, on a synthetic two-dataset trace
mixture of `--tokens` student tokens (default 200M) rendered with SmolLM2's tokenizer and chat
template, each measurement in a fresh process:

- build: the tokenized cache built from nothing (tokens/s, peak RSS), beside the limit measured
  in the same run: cores x the tokenizer alone on one core (the same texts, one at a time, before
  and after the build; their mean);
- second start: the cache opened again, the epoch planned and batches read (seconds, peak RSS,
  ms per 4 x 2048 batch);
- plan: `TrainData`'s epoch order and best-fit packing of 1M documents of R1-like lengths;
- step: a SmolLM2-shaped student (random weights) at batch 4 x 2048, its compiled step on a
  resident batch vs the same step fed by the real pipeline (cache -> packing -> prefetch thread ->
  device), interleaved, medians;
- size: cache bytes per token, without top-k and with 8 teacher entries per token.

    distill bench data --tokens 200000000 --out students/bench/data
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.bench.imports import in_fresh_process
from distill.data.render import render_example

# the columns of our trace schema that training reads (a Parquet folder of them is a dataset)
_SCHEMA = pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                     ("messages", pa.list_(pa.struct([("role", pa.string()),
                                                      ("content", pa.string())]))),
                     ("reasoning", pa.string()), ("answer", pa.string()), ("correct", pa.bool_()),
                     ("finish_reason", pa.string())])
_TOPK_SCHEMA = _SCHEMA.append(pa.field("top_ids", pa.list_(pa.list_(pa.int32())))).append(
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))))
_MATH = ("Let", "x", "=", "y", "+", "2", "17", "so", "the", "sum", "is", "\\frac{a}{b}", "wait,",
         "check", "again:", "(3", "- 1)", "^2", "therefore", "prime", "modulo", "7.", "Hmm,",
         "we", "get", "\\sqrt{", "}", "and", "then", "multiply", "by", "n,", "which", "gives",
         "1024.", "Now", "consider", "case", "k", "\\geq", "0;", "equation", "holds.")
_CODE = ("def", "f(x):", "return", "x", "*", "2", "for", "i", "in", "range(n):", "if", "a[i]",
         ">", "0:", "count", "+=", "1", "#", "check", "edge", "case", "print(", ")", "while",
         "True:", "break", "else:", "dp[j]", "=", "min(dp[j],", "dp[j-1]", "+", "cost)")


def corpus(rng, pool, words: int = 2_000_000) -> str:
    """Reasoning-like text: the pool's words and symbols, five thousand made-up words (BPE
    caches no more than it would on real text) and numbers of one to five digits."""
    syllables = ["ka", "lo", "mi", "ter", "an", "os", "vel", "dri", "num", "ex", "pro", "ty",
                 "ca", "re", "in", "sta", "ble", "ion", "qu", "ar"]
    made = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(5000)]
    numbers = [str(int(x)) for x in rng.integers(0, 99999, 5000)]
    vocab = np.array(list(pool) * 40 + made + numbers, dtype=object)
    return " ".join(vocab[rng.integers(0, len(vocab), words)])


def _trace(rng, i: int, text: str, chars: int, name: str) -> dict:
    start = int(rng.integers(0, max(1, len(text) - chars)))
    start = text.find(" ", start) + 1
    return {"id": f"{name}-{i}#0", "prompt_id": f"{name}-{i}",
            "prompt": f"Problem {i} ({name}): solve it step by step.", "messages": None,
            "reasoning": text[start:start + chars].strip(),
            "answer": f"The answer is \\boxed{{{i % 997}}}.", "correct": True,
            "finish_reason": "stop"}


def write_mixture(out: Path, tokens: int, tokens_per_char: float, shard: int = 1000,
                  chars: int = 12000) -> list[str]:
    """Two Parquet datasets (math-like 3/4 of the tokens, code-like 1/4), traces of lognormal
    lengths around `chars` characters (R1-like: a few hundred to ~16k tokens)."""
    sources = []
    for name, pool, share in (("math", _MATH, 0.75), ("code", _CODE, 0.25)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(name))
        text = corpus(rng, pool)
        target, made, i, n_shard = tokens * share, 0.0, 0, 0
        while made < target:
            rows = []
            for _ in range(shard):
                n = int(np.clip(rng.lognormal(np.log(chars), 0.6), 200, 5 * chars))
                rows.append(_trace(rng, i, text, n, name))
                made += n * tokens_per_char
                i += 1
                if made >= target:
                    break
            pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA),
                           folder / f"shard-{n_shard:05d}.parquet")
            n_shard += 1
        sources.append(str(folder))
    return sources


def write_topk(out: Path, tok, n: int = 300, k: int = 8) -> str:
    """A dataset whose traces carry k teacher entries per completion token (ids and
    log-probabilities made up, rows matching the student's tokenization)."""
    rng = np.random.default_rng(1)
    text = corpus(rng, _MATH, 200_000)
    rows = []
    for i in range(n):
        row = _trace(rng, i, text, 4000, "kd")
        ids, mask = render_example(tok, row["prompt"], row["reasoning"], row["answer"])
        c = int(mask.sum())
        row["top_ids"] = rng.integers(0, tok.vocab_size, (c, k)).tolist()
        row["top_logprobs"] = np.sort(-rng.exponential(2.0, (c, k)), axis=1)[:, ::-1].tolist()
        rows.append(row)
    folder = out / "kd"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_TOPK_SCHEMA), folder / "shard-00000.parquet")
    return str(folder)


_PER_CORE = """
import json, os, time
import pyarrow.parquet as pq
from pathlib import Path
from distill.data.render import render_texts
from distill.data.tokens import BATCH_TRACES
from distill.tokenizer import Tokenizer
tok = Tokenizer.from_pretrained({gguf!r})
texts = []
for source in {sources!r}:
    shards = sorted(Path(source).glob("*.parquet"))
    for shard in shards[::max(1, len(shards) // 4)][:4]:  # spread over the dataset
        for row in pq.read_table(shard).slice(0, {traces} // 4).to_pylist():
            texts.extend(render_texts(tok, row["prompt"], row["reasoning"], row["answer"]))
batch = 2 * BATCH_TRACES  # a prompt and a completion per trace, as the build encodes them
wall, cpu = time.perf_counter(), time.process_time()
n = sum(len(ids) for i in range(0, len(texts), batch) for ids in tok.encode_batch(texts[i:i + batch]))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
result = {{"tokens_per_s": n / wall, "cpu_per_wall": cpu / wall}}
"""


def per_core_rate(gguf: str, sources: list[str], traces: int = 400) -> dict:
    """The tokenizer alone on one core: the rendered texts of `traces` traces of each dataset
    (from four shards spread over it), encoded in the build's batches by the same call, in a
    process whose tokenizer runs one thread (TOKENIZERS_PARALLELISM=false; `cpu_per_wall` ~1
    shows it)."""
    code = _PER_CORE.format(gguf=gguf, sources=sources, traces=traces)
    return in_fresh_process(code, {"TOKENIZERS_PARALLELISM": "false"})


def _tokens_per_char(tok) -> float:
    rng = np.random.default_rng(0)
    return float(np.mean([len(tok.encode(t)) / len(t)
                          for t in (corpus(rng, _MATH, 20000), corpus(rng, _CODE, 20000))]))


_OPEN = """
import json, time
t_start = time.perf_counter()
from distill.tokenizer import Tokenizer
from distill.train.data import DataConfig, TrainData
tok = Tokenizer.from_pretrained({gguf!r})
cfg = DataConfig.model_validate_json({cfg!r})
t0 = time.perf_counter()
data = TrainData.from_config(cfg, tok, cache_root={root!r}, progress=False)
opened = time.perf_counter() - t0
steps = data.steps_per_epoch(0)
t1 = time.perf_counter()
batches = data.batches()
for _ in range({batches}):
    next(batches)
per_batch = (time.perf_counter() - t1) / max({batches}, 1)
cache = data.docs
result = {{"open_s": opened, "plan_s": t1 - t0 - opened, "since_start_s": t1 - t_start,
          "batch_ms": per_batch * 1e3, "documents": len(cache),
          "tokens": int(cache.lengths.sum()), "bytes": cache.nbytes(), "steps_per_epoch": steps,
          "packing": data.pack_stats(0).efficiency}}
"""


def _data_cfg(sources, **kw) -> str:
    from distill.train.data import DataConfig

    return DataConfig(traces=sources, seq_len=2048, batch_size=4, overlong="truncate",
                      **kw).model_dump_json()


def bench_build(gguf: str, sources: list[str], root: Path, batches: int = 200,
                top_k: int = 0) -> dict:
    """Build the cache in a fresh process, then open it again in another."""
    cfg = _data_cfg(sources, top_k=top_k)
    t0 = time.perf_counter()
    build = in_fresh_process(_OPEN.format(gguf=gguf, cfg=cfg, root=str(root), batches=0))
    build["wall_s"] = time.perf_counter() - t0
    again = in_fresh_process(_OPEN.format(gguf=gguf, cfg=cfg, root=str(root), batches=batches))
    return {"build": build, "second_start": again}


class _Lengths:
    """Just what `TrainData` plans from: per-document lengths (no tokens)."""

    def __init__(self, lengths: np.ndarray, datasets: int = 2):
        self.lengths = lengths
        self.first = np.full(len(lengths), 64, np.int64)
        self.dataset = (np.arange(len(lengths)) % datasets).astype(np.int32)
        self.has_teacher = self.teacher_bad = np.zeros(len(lengths), bool)
        self.rank = np.zeros(len(lengths))  # all in the split

    def __len__(self) -> int:
        return len(self.lengths)


def bench_plan(documents: int = 1_000_000, seq_len: int = 16384) -> dict:
    """Seconds to plan epoch 0 of `documents` R1-like documents (lognormal, median ~3k tokens)."""
    from distill.train.data import Corpus, StreamConfig, TrainData

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(3000), 0.8, documents), 100, 32768).astype(np.int64)
    docs = _Lengths(lengths)
    t0 = time.perf_counter()
    corpus = Corpus(docs, ("a", "b"), [np.zeros(0)] * 2, "synthetic", weights=(3.0, 1.0))
    data = TrainData(corpus, StreamConfig(seq_len=seq_len, batch_size=64))
    setup = time.perf_counter() - t0
    rows = len(data.epoch_rows(0))
    return {"documents": documents, "seq_len": seq_len, "rows": rows, "setup_s": setup,
            "plan_s": time.perf_counter() - t0 - setup}


_STEP = """
import json, statistics, time, resource
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from distill.bench.train import SMOLLM2_135M, OPTIM
from distill.parallel import make_mesh
from distill.pretrained import init_model
from distill.tokenizer import Tokenizer
from distill.train.config import LossConfig
from distill.train.data import DataConfig, TrainData
from distill.train.losses import make_loss_fn
from distill.train.optim import make_optimizer, schedule
from distill.train.prefetch import Prefetch
from distill.parallel import params_sharding
from distill.train.step import (TrainState, batch_sharding, compile_step, make_step,
                                split_trainable, state_sharding)
tok = Tokenizer.from_pretrained({gguf!r})
data = TrainData.from_config(DataConfig.model_validate_json({cfg!r}), tok, cache_root={root!r})
mesh = make_mesh({{}}, jax.devices()[:1])
model = init_model(SMOLLM2_135M.model_copy(update={{"remat": "full"}}), seed=0, mesh=mesh)
tx = make_optimizer(OPTIM, 100)
graphdef, params, frozen = split_trainable(model)
sh = state_sharding(graphdef, tx, params, mesh)
state = TrainState(params, jax.jit(tx.init, out_shardings=sh.opt_state)(params),
                   jax.device_put(jnp.zeros((), jnp.int32), sh.step))
del model, params
b_sh = batch_sharding(mesh)
step = compile_step(make_step(graphdef, tx, make_loss_fn(LossConfig()), schedule(OPTIM, 100), 1),
                    sh, mesh, params_sharding(frozen, mesh))
def prepare(item):
    batch, _ = item
    return {{k: jax.make_array_from_process_local_data(b_sh, np.asarray(v))
            for k, v in batch.items()}}
resident = prepare(next(data.batches()))
stream = Prefetch(map(prepare, data.batches()), depth=2)
state, m = step(state, resident, frozen); jax.block_until_ready(m)   # compile, warm up
state, m = step(state, next(stream), frozen); jax.block_until_ready(m)
times = {{"resident": [], "pipeline": []}}
for _ in range({steps}):
    for name in times:
        t = time.perf_counter()
        batch = resident if name == "resident" else next(stream)
        state, m = step(state, batch, frozen); jax.block_until_ready(m)
        times[name].append(time.perf_counter() - t)
stream.close()
result = {{k: statistics.median(v) for k, v in times.items()}}
result["all"] = times
"""


def bench_step(gguf: str, sources: list[str], root: Path, steps: int) -> dict:
    out = in_fresh_process(_STEP.format(gguf=gguf, cfg=_data_cfg(sources), root=str(root), steps=steps))
    out["overhead"] = out["pipeline"] / out["resident"] - 1
    return out


def run(gguf: str, tokens: int, out: Path, steps: int) -> dict:
    from distill.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(gguf)
    t0 = time.perf_counter()
    sources = write_mixture(out / "traces", tokens, _tokens_per_char(tok))
    kd = write_topk(out / "traces", tok)
    written = time.perf_counter() - t0
    cores = os.cpu_count() or 1
    before = [per_core_rate(gguf, sources) for _ in range(2)]
    root = out / "cache"
    shutil.rmtree(root, ignore_errors=True)
    built = bench_build(gguf, sources, root)
    after = [per_core_rate(gguf, sources) for _ in range(2)]
    # the machine's speed drifts: the limit is the mean of two runs before and two after
    per_core = float(np.mean([r["tokens_per_s"] for r in before + after]))
    build = built["build"]
    build["tokens_per_s"] = build["tokens"] / build["open_s"]
    limit = cores * per_core
    kd_built = bench_build(gguf, [kd], root, batches=0, top_k=8)["build"]
    result = {
        "tokens": build["tokens"], "documents": build["documents"], "cores": cores,
        "write_synthetic_s": written,
        "tokenizer_per_core_tokens_per_s": {"before": before, "after": after, "mean": per_core},
        "limit_tokens_per_s": limit, "build": build,
        "build_vs_limit": build["tokens_per_s"] / limit,
        "second_start": built["second_start"], "plan_1m": bench_plan(),
        "bytes_per_token": {"no_topk": build["bytes"] / build["tokens"],
                            "topk8": kd_built["bytes"] / kd_built["tokens"]},
    }
    if steps:
        result["step_4x2048"] = bench_step(gguf, sources, root, steps)
    return result


def main(gguf: str, tokens: int, out: Path, steps: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    result = run(gguf, tokens, out, steps)
    (out / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    return json.dumps(result, indent=2)
