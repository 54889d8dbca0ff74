"""The report of `distill eval`: eval.json, eval.md, samples.jsonl and plots, written together.

eval.json holds, per model, only numbers the samples determine (so the same seed gives the same
file), with wall-clock figures apart under "timing".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from distill.data.benchmarks import benchmark, published
from distill.data.records import PromptRecord
from distill.eval import metrics as M
from distill.eval import plots
from distill.eval.config import EvalConfig
from distill.fsutil import FREE, fsync_dir, writing


def model_metrics(run, prompts: list[PromptRecord]) -> dict:
    """One model's section of eval.json (see the module docstrings for the definitions)."""
    correct = [[o.correct for o in group] for group in run.samples]
    answers = [[o.predicted for o in group] for group in run.samples]
    flat = [o for group in run.samples for o in group]
    lo, hi = M.pass_at_1_ci(correct)
    entry = run.entry
    out = {
        "name": run.name, "role": entry.role, "kind": entry.kind, "model": entry.model,
        "pass@1": {"value": M.pass_at_1(correct), "ci95": [lo, hi]},
        "cons@n": M.proportion(M.cons_correct(answers, correct)),
        "greedy": None if run.greedy is None else M.proportion([o.correct for o in run.greedy]),
        "format": sum(o.think_closed for o in flat) / len(flat),
        "answered": sum(o.think_closed and o.predicted is not None for o in flat) / len(flat),
        "truncated": sum(o.finish_reason == "length" for o in flat) / len(flat),
        "lengths": M.length_stats([o.tokens for o in flat]),
        "by_difficulty": M.by_difficulty(correct, [p.meta.get("difficulty") for p in prompts]),
        "agreement": run.agreement,
        "notes": run.notes,
    }
    thinking = [o.thinking for o in flat if o.thinking is not None]
    if thinking:  # budget forcing: how long the samples thought
        out["thinking"] = {"mean_tokens": sum(t.tokens for t in thinking) / len(thinking),
                           "forced": sum(t.forced for t in thinking) / len(thinking),
                           "waits": sum(t.waits for t in thinking) / len(thinking)}
    return out


def timing(run) -> dict:
    """Wall-clock figures of this run's sampling (greedy pass included): seconds, samples drawn
    and generated tokens, tokens/s; `resumed`: the samples an earlier run had stored."""
    stored = sum(map(len, run.samples)) + len(run.greedy or [])
    tokens = run.sampled_tokens
    return {"seconds": run.seconds, "samples": run.sampled, "resumed": stored - run.sampled,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / run.seconds if run.seconds > 0 and tokens else None}


def build_report(name: str, out_dir: Path, cfg: EvalConfig, prompts: list[PromptRecord],
                 runs: list) -> dict:
    """eval.json's content."""
    return {
        "name": name,
        "output": str(out_dir),
        "prompts": {"count": len(prompts), "source": _source(cfg),
                    "split": cfg.prompts.split if cfg.prompts else benchmark(
                        cfg.benchmark.name).split,
                    "with_difficulty": sum("difficulty" in p.meta for p in prompts)},
        "benchmark": cfg.benchmark.name if cfg.benchmark else None,
        "published": _published(cfg, runs),
        "protocol": cfg.protocol.model_dump(),
        "answer_pattern": cfg.answer_pattern,
        "models": [model_metrics(run, prompts) for run in runs],
        "timing": {run.name: timing(run) for run in runs},
    }


def _source(cfg: EvalConfig) -> str:
    if cfg.prompts is not None:
        return cfg.prompts.source
    return cfg.benchmark.source or benchmark(cfg.benchmark.name).source


def _published(cfg: EvalConfig, runs: list) -> dict:
    """{model name: [{"pass@1": published %, "harness": who measured it}, ...]} for the evaluated
    models that have published numbers on this benchmark (matched by model name), open-r1's
    lighteval measurement (like-for-like under the open-r1 reading) first."""
    if cfg.benchmark is None:
        return {}
    found = {run.name: published(run.name, cfg.benchmark.name) for run in runs}
    return {name: [{"pass@1": v, "harness": h} for v, h in p] for name, p in found.items() if p}


# ---------------------------------------------------------------------------------------------
# Markdown


_READINGS = {"open-r1": "as open-r1 reads them (lighteval d3da6b9b's extractive match, whole "
                         "completion)",
             "strict": "strictly (the last \\boxed{} or anchored letter after </think>)"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _with_ci(m: dict | None) -> str:
    if m is None:
        return "–"
    lo, hi = m["ci95"]
    return f"{_pct(m['value'])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _num(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _rows(model: dict, timing_: dict, n: int) -> dict[str, str]:
    a = model["agreement"] or {}
    lengths = model["lengths"]
    rows = {
        f"pass@1 (n={n}) [95% CI]": _with_ci(model["pass@1"]),
        f"cons@{n} [95% CI]": _with_ci(model["cons@n"]),
        "greedy [95% CI]": _with_ci(model["greedy"]),
        "format (think closed)": _pct(model["format"]),
        "answered (think closed, answer read)": _pct(model.get("answered")),
        "truncated": _pct(model["truncated"]),
        "length mean / p50 / p90 (tokens)":
            f"{lengths['mean']:.0f} / {lengths['p50']:.0f} / {lengths['p90']:.0f}",
        "generated tokens/s": _num(timing_["tokens_per_s"], ".1f"),
        "KL to teacher (nats/token)": _num(a.get("kl"), ".4f"),
        "top-1 agreement": _pct(a.get("top1_agreement")),
    }
    if model.get("thinking"):
        t = model["thinking"]
        rows["thinking tokens (mean)"] = f"{t['mean_tokens']:.0f}"
        rows["thinking ended at the budget"] = _pct(t["forced"])
        if t["waits"]:
            rows["waits inserted (mean)"] = f"{t['waits']:.2f}"
    if a.get("nll") is not None:  # scored on text-only traces
        rows["NLL of teacher traces (nats/token)"] = _num(a["nll"], ".4f")
    for d, v in model["by_difficulty"].items():
        rows[f"pass@1, difficulty {d}"] = f"{_pct(v['pass@1'])} (n={v['prompts']})"
    return rows


def _forcing(protocol: dict) -> str:
    """The header's words on budget forcing ("" without it)."""
    parts = []
    if protocol.get("thinking_budget"):
        parts.append(f"thinking budget {protocol['thinking_budget']} tokens" + (
            f" (then {protocol['answer_prefix']!r})" if protocol.get("answer_prefix") else ""))
    if protocol.get("min_thinking"):
        parts.append(f"thinking at least {protocol['min_thinking']} tokens "
                     f"(wait: {protocol['wait']!r})")
    return f" Budget forcing: {', '.join(parts)}; max {protocol['max_new_tokens']} new tokens." if (
        parts) else ""


def markdown(report: dict) -> str:
    """A table: a row per metric, a column per model, students first and the teacher last."""
    models = sorted(report["models"], key=lambda m: m["role"] == "teacher")
    n = report["protocol"]["n"]
    cols = [_rows(m, report["timing"][m["name"]], n) for m in models]
    names = [f"**{m['name']}** (teacher)" if m["role"] == "teacher" else m["name"] for m in models]
    keys = list(dict.fromkeys(key for c in cols for key in c))
    lines = [f"# eval: {report['name']}", "",
             f"{report['prompts']['count']} prompts ({report['prompts']['source']}, split "
             f"{report['prompts']['split']}); temperature {report['protocol']['temperature']}, "
             f"top-p {report['protocol']['top_p']}, {n} samples per prompt, seed "
             f"{report['protocol']['seed']}; answers read "
             f"{_READINGS[report['protocol']['answer_reading']]}.{_forcing(report['protocol'])}",
             "",
             "| metric | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {key} | " + " | ".join(c.get(key, "–") for c in cols) + " |" for key in keys]
    published_ = report.get("published") or {}
    if published_:
        lines.append("| published pass@1 | " + " | ".join(
            " · ".join(f"{p['pass@1']:.1f}% ({p['harness']})" for p in published_[m["name"]])
            if m["name"] in published_ else "–" for m in models) + " |")
    notes = [f"- {m['name']}: {n}" for m in models for n in m["notes"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# ---------------------------------------------------------------------------------------------
# Files


def sample_rows(runs: list, prompts: list[PromptRecord]):
    """samples.jsonl rows: one per model, prompt and sample (greedy ones marked)."""
    for run in runs:
        for prompt, group, g in zip(prompts, run.samples, run.greedy or [None] * len(prompts),
                                    strict=True):
            for o, greedy in [(o, False) for o in group] + ([(g, True)] if g else []):
                yield {"model": run.name, "prompt_id": prompt.id, "sample_index": o.sample_index,
                       "greedy": greedy, "reference": prompt.reference,
                       "predicted": o.predicted, "correct": o.correct,
                       "think_closed": o.think_closed, "tokens": o.tokens,
                       "finish_reason": o.finish_reason, "completion": o.completion,
                       **_thinking_fields(o)}


def _thinking_fields(o) -> dict:
    """A budget-forced sample's thinking tokens, forced close and waits (nothing otherwise)."""
    t = o.thinking
    return {} if t is None else {"thinking_tokens": t.tokens, "forced": t.forced, "waits": t.waits}


def write_outputs(out_dir: Path, report: dict, runs: list, prompts: list[PromptRecord],
                  loss_curves: dict[str, Path], kept: str | None = None) -> None:
    """Write every file into a temporary sibling folder, then swap it in for `out_dir`; a failed
    write (a full disk) leaves `out_dir` as it was and ends in one line (which says `kept`:
    what else is safe)."""
    safe = (f"the previous report in {out_dir} is untouched" if out_dir.exists() else
            f"no report was written to {out_dir}") + (f"; {kept}" if kept else "")
    safe += f"; {FREE} and rerun the same command"
    with writing(out_dir, safe):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        _write_into(tmp, out_dir, report, runs, prompts, loss_curves)


def _write_into(tmp: Path, out_dir: Path, report: dict, runs: list, prompts: list[PromptRecord],
                loss_curves: dict[str, Path]) -> None:
    try:
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for row in sample_rows(runs, prompts):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "eval.md").write_text(markdown(report), encoding="utf-8")
        lengths = {run.name: [o.tokens for g in run.samples for o in g]
                   for run in sorted(runs, key=lambda r: r.entry.role == "teacher")}
        plots.write_all(tmp / "plots", report["models"], lengths, loss_curves)
        (tmp / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Replace `target` by `new`; the old report is removed only once the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
