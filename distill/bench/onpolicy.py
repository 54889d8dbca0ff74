"""`distill bench --suite onpolicy`: what an on-policy distillation step costs beside an SFT step
on the same student, and where its time goes (sampling through the engine, the teacher's scoring,
the training step itself).

Both runs go through `distill train` (`run_train`) on the same model, one after the other in one
process: SFT on reference traces of the synthetic arithmetic task, and on-policy distillation on
its prompts with the same model as its own in-process teacher. Each logs its wall time per step
(`step_s`, every step); the first `warm` steps (compilation) are left out and the median of the
rest is reported, with the on-policy step's rollout and scoring shares.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import jax
import yaml

from distill.data.prompts import PromptsConfig
from distill.runs import METRICS
from distill.traces.reference import write_reference_traces
from distill.train.loop import run_train

PROMPTS = {"source": "synthetic", "synthetic": {"n": 400, "seed": 0, "style": "compact",
                                                "min_steps": 2, "max_steps": 2}}


def _config(work: Path, name: str, model: str, steps: int, **sections) -> Path:
    cfg = {"name": name, "student": {"init": model},
           "optim": {"lr": 1e-5, "warmup_steps": 1},
           "train": {"steps": steps, "log_every": 1, "checkpoint_every": steps,
                     "async_checkpoints": False, "prefetch": 0},
           "output_root": str(work), **sections}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _step_times(run_dir: Path, warm: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    return [r for r in rows if "step_s" in r][warm:]


def bench_onpolicy(model: str | Path, *, rows: int = 8, seq_len: int = 128, new_tokens: int = 64,
                   group: int = 2, steps: int = 6, warm: int = 2) -> dict:
    """SFT vs on-policy step time on `model` (any MODEL path with a tokenizer): SFT rows of
    `seq_len` tokens, on-policy `rows` sequences (rows / group prompts x `group` samples of up to
    `new_tokens` tokens). One device."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        traces = write_reference_traces(PromptsConfig(**PROMPTS), work / "traces")
        sft = _config(work, "sft", str(model), steps,
                      data={"traces": [str(traces)], "seq_len": seq_len, "batch_size": rows})
        onp = _config(work, "onpolicy", str(model), steps, onpolicy={
            "prompts": PROMPTS, "teacher": {"kind": "jax", "model": str(model)},
            "group_size": group, "prompts_per_step": rows // group,
            "max_new_tokens": new_tokens, "engine": {"slots": rows}})
        devices = jax.devices()[:1]
        run_train(sft, progress=False, devices=devices)
        run_train(onp, progress=False, devices=devices)
        a, b = _step_times(work / "sft", warm), _step_times(work / "onpolicy", warm)
    sft_s = statistics.median(r["step_s"] for r in a)
    onp_s = statistics.median(r["step_s"] for r in b)
    rollout = statistics.median(r["rollout_s"] / r["step_s"] for r in b)
    score = statistics.median(r["score_s"] / r["step_s"] for r in b)
    return {"model": str(model), "rows": rows, "seq_len": seq_len, "new_tokens": new_tokens,
            "group": group, "steps_timed": len(b), "sft_step_s": sft_s, "onpolicy_step_s": onp_s,
            "ratio": onp_s / sft_s, "rollout_share": rollout, "score_share": score,
            "train_share": max(0.0, 1.0 - rollout - score),
            "completion_tokens": statistics.median(r["completion_tokens"] for r in b)}


def table(r: dict) -> str:
    return "\n".join([
        f"on-policy vs SFT step, {r['model']} ({r['rows']} rows; SFT rows of {r['seq_len']} "
        f"tokens, on-policy samples of up to {r['new_tokens']} new tokens, G={r['group']})",
        f"  SFT step        {r['sft_step_s']:.3f} s",
        f"  on-policy step  {r['onpolicy_step_s']:.3f} s  ({r['ratio']:.2f}x SFT)",
        f"    sampling (engine)  {r['rollout_share']:.0%}",
        f"    teacher scoring    {r['score_share']:.0%}",
        f"    training step      {r['train_share']:.0%}",
        f"  median completion  {r['completion_tokens']:.0f} tokens"])
