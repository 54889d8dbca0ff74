"""Trace datasets written from the synthetic task's worked solutions instead of a teacher.

They use the same store and schema as `distill generate`, so the trainer reads them like teacher
traces. The demo trains its tiny MoE teacher on them; `answers_only` writes the baseline that sees
final answers without the steps.
"""

from __future__ import annotations

from pathlib import Path

from distill.chat import completion_text
from distill.data.prompts import PromptsConfig, load_prompts
from distill.data.records import Sample
from distill.data.synthetic import arithmetic_problems, final_answer, solution_reasoning
from distill.traces.filters import Verdict
from distill.traces.generate import SamplingConfig, trace_row
from distill.traces.store import TraceStore


def write_reference_traces(prompts: PromptsConfig, run_dir: str | Path, *,
                           answers_only: bool = False, prompts_per_shard: int = 256) -> Path:
    """One trace per synthetic prompt of `prompts`: reasoning = the worked steps (empty with
    `answers_only`), answer = the boxed result; replaces what `run_dir` held."""
    if prompts.source != "synthetic":
        raise ValueError("reference traces need synthetic prompts (they carry worked solutions)")
    s = prompts.synthetic
    problems = {p.id: p for p in arithmetic_problems(s.n, seed=s.seed, min_steps=s.min_steps,
                                                     max_steps=s.max_steps, style=s.style)}
    records = load_prompts(prompts)
    config = {"reference": True, "answers_only": answers_only,
              "prompts": prompts.model_dump(mode="json")}
    store = TraceStore.open(run_dir, config, overwrite=True)
    sampling = SamplingConfig(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1)
    for k in range(0, len(records), prompts_per_shard):
        rows = []
        for rec in records[k:k + prompts_per_shard]:
            p = problems[rec.id]
            reasoning = "" if answers_only else solution_reasoning(p)
            answer = final_answer(p)
            sample = Sample(0, completion_text(reasoning, answer), "stop", 0, 0)
            rows.append(trace_row(rec, sample, Verdict(None, reasoning, answer, p.answer, True),
                                  "reference:synthetic", sampling))
        n = len(rows)
        store.add_shard(k // prompts_per_shard, rows,
                        {"prompts": n, "samples": n, "rejected": {}, "prompt_tokens": 0,
                         "completion_tokens": 0})
    store.finish(f"# reference traces\n\nWorked solutions of {len(records)} synthetic problems"
                 f"{' (answers only)' if answers_only else ''}.\n")
    return Path(run_dir)
