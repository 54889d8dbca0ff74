"""Per-token agreement of a student with the teacher on the teacher's own traces.

Each trace is rendered for the student exactly as training renders it
(`distill.data.render.render_example`: chat-templated prompt, then
`{reasoning}\\n</think>\\n\\n{answer}` and EOS), and the student runs one forward pass over it.
Two cases, by what the traces carry:

Traces with the teacher's top-k log-probabilities (our store, `sampling.logprobs`). At completion
token j the teacher's stored top-k (ids and log-probabilities) meets the student's next-token
distribution p at the position before it:

- kl: sum_k q_k (log q_k - log p(id_k)), q the teacher's top-k renormalised over its k entries,
  p the student's softmax over the full vocabulary read at those ids (nats per token, >= 0). This
  is the `forward_kl` distillation loss at temperature 1, so it is directly the quantity logit
  distillation minimises; student mass outside the teacher's top-k counts against it.
- top1_agreement: the student's argmax equals the teacher's most likely token.

Stored ids mean the teacher's token ids, so only a student whose vocabulary is the teacher's (same
token -> id map) is scored; a trace whose top-k rows do not line up one to one with the student's
completion tokens (rows == tokens, or one fewer when the teacher stopped before scoring EOS) is
skipped and counted.

Traces of text only (the public datasets, any trace source `distill.data.traces` reads): the
student's own tokens of the teacher's completion are the targets, so any student is scored:

- nll: the student's cross-entropy on the teacher's completion tokens (nats per token), the
  held-out SFT loss on the teacher's traces;
- top1_agreement: the student's argmax equals the teacher's next token.

Both are token-level means over every scored completion token of every trace.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from distill import runs
from distill.data.render import render_example, render_traces
from distill.data.store import MANIFEST, column_filled, read_manifest
from distill.data.traces import as_source, open_traces
from distill.errors import DistillError
from distill.eval.config import KLConfig
from distill.losses import Divergence, TeacherTopK, chunked_loss
from distill.tokenizer import Tokenizer

_BUCKET = 64  # sequences are right-padded to a multiple of this (fewer recompiles)


def load_tokenizer(path: str | Path):
    """The tokenizer of any MODEL path (HF directory, GGUF file, students/<run>, tokenizer
    directory), or None when the path carries none (a preset YAML)."""
    p = Path(path)
    if not p.exists():
        raise DistillError(f"{p}: no such file or directory (the teacher's tokenizer)")
    if runs.is_run(p):
        return runs.read_tokenizer(p)
    if p.suffix in (".yaml", ".yml"):
        return None
    return Tokenizer.from_pretrained(p)


def teacher_tokenizer(cfg: KLConfig, teacher_entry):
    """(tokenizer, None) or (None, why not): kl.tokenizer, else the jax teacher entry's
    tokenizer or model, else the model named by the traces' manifest (a jax teacher)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), None
    if teacher_entry is not None and teacher_entry.kind == "jax":
        return load_tokenizer(teacher_entry.tokenizer or teacher_entry.model), None
    source = as_source(cfg.traces).source
    if (Path(source) / MANIFEST).is_file():
        teacher = read_manifest(Path(source)).get("teacher") or {}
        if teacher.get("kind") == "jax" and Path(teacher.get("model", "")).exists():
            return load_tokenizer(teacher["model"]), None
    return None, "the teacher's tokenizer is unknown (set kl.tokenizer)"


def load_kl_traces(cfg: KLConfig, prompt_ids: set[str]) -> tuple[list, bool]:
    """(the first `max_samples` traces in source order, whether they carry teacher top-k
    log-probabilities): those that do when the source is our store with top-k columns, else any
    (text only), of the evaluated prompts only when `only_eval_prompts`."""
    source = as_source(cfg.traces)
    opened = open_traces(source, keep="all")
    with_topk = opened.preset == "distill" and column_filled(opened.rows.files, "top_ids")
    kept = []
    for t in opened.traces(with_teacher=with_topk):  # streamed: a 1M-row source is not read
        if with_topk and (t.top_ids is None or not len(t.top_ids)):  # whole for 64 traces
            continue
        if not cfg.only_eval_prompts or t.prompt_id in prompt_ids:
            kept.append(t)
            if len(kept) == cfg.max_samples:
                break
    if not kept:
        what = "trace with teacher top-k log-probabilities" if with_topk else "trace"
        where = " for the evaluated prompts (set kl.only_eval_prompts: false to use them all)" \
            if cfg.only_eval_prompts else ""
        raise DistillError(f"{source.source}: no {what}{where}")
    return kept, with_topk


def _prepare(trace, tokenizer) -> dict | None:
    """Padded [1, T] arrays for one trace, or None when it cannot be scored (no assistant text,
    or top-k rows that do not line up)."""
    if trace.top_bytes is not None:
        return _prepare_aligned(trace, tokenizer)
    try:
        ids, mask = render_example(tokenizer, trace.prompt, trace.reasoning, trace.answer)
    except DistillError:
        return None
    first = int(np.argmax(mask))  # the first completion token
    rows = len(ids) - first if trace.top_ids is None else len(trace.top_ids)
    if rows not in (len(ids) - first, len(ids) - first - 1):
        return None
    if trace.top_ids is not None and int(trace.top_ids.max()) >= tokenizer.vocab_size:
        return None
    out, span = _arrays(ids, first, rows, None if trace.top_ids is None else trace.top_ids.shape[1])
    out["mask"][0, span] = True
    if trace.top_ids is None:  # text only: the trace's own next tokens
        out["targets"][0, span] = ids[first:first + rows]
        return out
    best = np.argmax(trace.top_logprobs, axis=1)
    out["targets"][0, span] = trace.top_ids[np.arange(rows), best]  # the teacher's top-1
    out["top_ids"][0, span] = trace.top_ids
    out["top_lps"][0, span] = trace.top_logprobs
    return out


def _prepare_aligned(trace, tokenizer) -> dict | None:
    """`_prepare` for traces that keep their tokens' bytes, through the alignment training uses
    (`distill.data.render`), so any student tokenizer can be scored: the positions are the
    first student token of each aligned span whose teacher top-1 entry is a student token; the
    target there is that token."""
    (r,) = render_traces(tokenizer, [trace], trace.top_ids.shape[1])
    if r is None or r.top_ids is None:
        return None
    v, first = tokenizer.vocab_size, r.first
    ids, lps = r.top_ids.astype(np.int64), r.top_logprobs.astype(np.float32)
    best = ids[np.arange(len(ids)), np.argmax(lps, axis=1)]
    scored = np.isfinite(lps).any(1) & (best < v)
    ids[ids >= v] = -1  # unmatched (the losses read any id outside [0, V) so)
    out, span = _arrays(r.ids, first, len(ids), ids.shape[1])
    out["mask"][0, span] = scored
    out["targets"][0, span] = np.where(scored, best, 0)
    out["top_ids"][0, span], out["top_lps"][0, span] = ids, lps
    return out


def _arrays(ids, first: int, rows: int, k: int | None) -> tuple[dict, slice]:
    """Zeroed [1, T] arrays (T: len(ids) rounded up to _BUCKET) with the tokens filled in and,
    with `k`, [1, T, k] top-k arrays (no entries); and the positions of completion tokens
    0..rows-1 (completion token j is predicted at position first + j - 1)."""
    t = -(-len(ids) // _BUCKET) * _BUCKET
    out = {"tokens": np.zeros((1, t), np.int32), "targets": np.zeros((1, t), np.int32),
           "mask": np.zeros((1, t), bool)}
    out["tokens"][0, :len(ids)] = ids
    if k is not None:
        out["top_ids"] = np.zeros((1, t, k), np.int32)
        out["top_lps"] = np.full((1, t, k), -np.inf, np.float32)
    return out, slice(first - 1, first - 1 + rows)


def _score_fn():

    @partial(jax.jit, static_argnums=0)
    def score(graphdef, state, tokens, targets, mask, top_ids=None, top_lps=None):
        model = nnx.merge(graphdef, state)
        if top_ids is None:  # text only: cross-entropy on the trace's tokens
            _, m = chunked_loss(model.hidden(tokens), model.logits, targets, mask)
            return m["ce"] * m["tokens"], m["tokens"], m["accuracy"] * m["tokens"], m["tokens"]
        # KL over the entries that are student tokens (q over the whole top-k): with one
        # tokenizer every entry is, and this is forward KL
        _, m = chunked_loss(model.hidden(tokens), model.logits, targets, mask,
                            TeacherTopK(top_ids, top_lps),
                            div=Divergence("gold", unmatched_weight=0.0), alpha=1.0)
        # sums, so traces add up to token-level means
        return m["kd"] * m["kd_tokens"], m["kd_tokens"], m["accuracy"] * m["tokens"], m["tokens"]

    return score


def agreement(model, tokenizer, traces: list) -> dict:
    """{"traces", "skipped", "tokens", "kl" or "nll", "top1_agreement"} of a student on
    `traces` ("kl" when they carry teacher top-k, "nll" when they are text only)."""
    score = _score_fn()
    graphdef, state = nnx.split(model)
    loss_sum = loss_tokens = hits = tokens = 0.0
    used = 0
    for trace in traces:
        batch = _prepare(trace, tokenizer)
        if batch is None:
            continue
        a, b, c, d = score(graphdef, state, **batch)
        loss_sum, loss_tokens = loss_sum + float(a), loss_tokens + float(b)
        hits, tokens = hits + float(c), tokens + float(d)
        used += 1
    key = "kl" if traces and traces[0].top_ids is not None else "nll"
    return {"traces": used, "skipped": len(traces) - used, "tokens": int(tokens),
            key: loss_sum / loss_tokens if loss_tokens else None,
            "top1_agreement": hits / tokens if tokens else None}
