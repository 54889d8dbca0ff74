"""`distill generate`: prompts -> teacher -> answer checks and filters -> shard store, resumably.

The run's prompts are cut into shards of `output.prompts_per_shard` in order. Shards are generated
one after another and each is stored atomically with the manifest listing it, so a crash (even
`kill -9`) loses at most the shard in flight, and rerunning the same command continues from the
first shard the manifest does not list. Every (prompt_id, sample_index) is judged exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

from pydantic import Field

from distill.backends import Sampler, SamplerConfig, make_sampler
from distill.config import Frozen, OutputPath, load_config
from distill.data.prompts import PromptsConfig, load_prompts
from distill.data.records import PromptRecord, Sample, record_id
from distill.errors import DistillError
from distill.sampling import NewTokens, SamplingParams, SystemPrompt, Temperature, TopLogprobs, TopP
from distill.traces.filters import FiltersConfig, Judge
from distill.traces.progress import GenerateProgress
from distill.traces.store import TraceStore


class SamplingConfig(SystemPrompt, SamplingParams):
    """How the teacher samples (the engine's settings, with R1's recommended defaults: temperature
    0.6, top-p 0.95); `n` samples per prompt feed rejection sampling; `system`: the system prompt.
    `params()` gives the engine's settings."""

    temperature: Temperature = 0.6
    top_p: TopP = 0.95
    max_new_tokens: NewTokens = 1024
    logprobs: TopLogprobs = 0  # store the teacher's top-k log-probabilities per token


class OutputConfig(Frozen):
    root: OutputPath = Field("teacher_traces", validate_default=True)  # runs go to root/<name>
    prompts_per_shard: int = Field(64, ge=1)


class GenerateConfig(Frozen):
    """A run config: configs/runs/*.yaml with these sections."""

    name: str | None = None  # the run directory under output.root; default: the config file's stem
    prompts: PromptsConfig
    teacher: SamplerConfig
    sampling: SamplingConfig = SamplingConfig()
    filters: FiltersConfig = FiltersConfig()
    output: OutputConfig = Field(default_factory=OutputConfig)  # made at load: root resolved then


# Fields that change how fast or how robustly a run goes, not what it produces: they may differ
# between a run and its resumption (an in-process teacher's engine shape included: each prompt
# samples from its own seed, whatever runs beside it).
OPERATIONAL = {"teacher": {"concurrency", "timeout_s", "max_retries", "backoff_initial_s",
                           "backoff_max_s", "api_key_env", "mesh", "engine"}, "output": {"root"}}


def identity_config(cfg: GenerateConfig) -> dict:
    """The part of the config that determines the traces (compared when a run resumes)."""
    data = json.loads(cfg.model_dump_json())
    for section, keys in OPERATIONAL.items():
        for key in keys:
            data[section].pop(key, None)
    return data


@dataclasses.dataclass
class Summary:
    run_dir: Path
    prompts: int
    samples: int
    records: int
    rejected: dict[str, int]
    completion_tokens: int
    seconds: float
    resumed_shards: int


def trace_row(prompt: PromptRecord, sample: Sample, verdict, teacher: str,
              sampling: SamplingConfig) -> dict:
    """One stored record (see TRACE_SCHEMA)."""
    messages = prompt.prompt if isinstance(prompt.prompt, list) else None
    text = prompt.prompt if isinstance(prompt.prompt, str) else "\n\n".join(
        m["content"] for m in prompt.prompt if m.get("role") == "user")
    return {
        "id": record_id(prompt.id, sample.sample_index), "prompt_id": prompt.id,
        "sample_index": sample.sample_index, "prompt": text, "messages": messages,
        "reasoning": verdict.reasoning, "answer": verdict.answer, "completion": sample.completion,
        "reference": prompt.reference, "predicted": verdict.predicted, "correct": verdict.correct,
        "finish_reason": sample.finish_reason, "prompt_tokens": sample.prompt_tokens,
        "completion_tokens": sample.completion_tokens, "teacher": teacher,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed},
        "meta": json.dumps(prompt.meta, sort_keys=True) if prompt.meta else None,
        "top_ids": sample.top_ids, "top_logprobs": sample.top_logprobs,
        "token_bytes": sample.token_bytes, "top_bytes": sample.top_bytes,
    }


def judge_shard(judge: Judge, prompts: list[PromptRecord], samples: list[list[Sample]],
                teacher: str, sampling: SamplingConfig) -> tuple[list[dict], dict]:
    """Judge every sample of a shard's prompts; return the kept rows and the shard's stats."""
    rows, rejected = [], Counter()
    prompt_tokens = completion_tokens = 0
    for prompt, group in zip(prompts, samples, strict=True):
        if len(group) != sampling.n:
            raise DistillError(f"prompt {prompt.id}: the teacher returned {len(group)} samples, "
                               f"expected {sampling.n}")
        for sample in sorted(group, key=lambda s: s.sample_index):
            prompt_tokens += sample.prompt_tokens
            completion_tokens += sample.completion_tokens
            verdict = judge.judge(prompt, sample)
            if verdict.reason is None:
                rows.append(trace_row(prompt, sample, verdict, teacher, sampling))
            else:
                rejected[verdict.reason] += 1
        judge.forget(prompt.id)
    stats = {"prompts": len(prompts), "samples": sum(len(g) for g in samples),
             "rejected": dict(rejected), "prompt_tokens": prompt_tokens,
             "completion_tokens": completion_tokens}
    return rows, stats


def run_generate(config_path: str | Path, overrides=(), *, overwrite: bool = False,
                 progress: bool = True) -> Summary:
    """Run (or resume) the generation a run config describes."""
    config_path = Path(config_path)
    cfg = load_config(GenerateConfig, config_path, overrides, check_paths=True)
    name = cfg.name or config_path.stem
    prompts = load_prompts(cfg.prompts)
    run_dir = Path(cfg.output.root) / name
    store = TraceStore.open(run_dir, identity_config(cfg), overwrite=overwrite)
    pps = cfg.output.prompts_per_shard
    shards = [prompts[i:i + pps] for i in range(0, len(prompts), pps)]
    todo = [k for k in range(len(shards)) if k not in store.done()]
    resumed = len(shards) - len(todo)
    t0 = time.perf_counter()
    if todo:
        # dedup is per prompt and a prompt's samples share a shard, so a resumed run needs no
        # state from the stored shards to judge exactly as an uninterrupted one
        judge = Judge(cfg.filters)
        teacher = make_sampler(cfg.teacher)
        try:
            store.set_info(teacher=teacher.identity, prompt_count=len(prompts),
                           tokenizer=teacher.tokenizer_identity)
            _generate_shards(cfg, teacher, judge, store, {k: shards[k] for k in todo},
                             len(prompts), progress)
        finally:
            teacher.close()
    totals = store.finish(dataset_card(name, run_dir, store.manifest))
    return Summary(run_dir, totals["prompts"], totals["samples"], totals["records"],
                   totals["rejected"], totals["completion_tokens"], time.perf_counter() - t0,
                   resumed)


def _generate_shards(cfg: GenerateConfig, teacher: Sampler, judge: Judge, store: TraceStore,
                     shards: dict[int, list[PromptRecord]], total: int, progress: bool) -> None:
    """Sample, judge and store each shard ({index in the run: its prompts}; `total` prompts in
    the run)."""
    teacher_name = _teacher_name(teacher.identity)
    with GenerateProgress(total, cfg.sampling.n, store.totals(), enabled=progress) as bar:
        for k, shard in shards.items():
            samples = teacher.complete(shard, cfg.sampling.params(), cfg.sampling.system,
                                       on_sample=bar.on_sample)
            rows, stats = judge_shard(judge, shard, samples, teacher_name, cfg.sampling)
            store.add_shard(k, rows, stats)
            bar.on_shard(stats, len(rows))


def _teacher_name(identity: dict) -> str:
    return f"{identity['kind']}:{identity['model']}"


def dataset_card(name: str, run_dir: Path, manifest: dict) -> str:
    """The README.md of a trace dataset (generated or imported): what it is, how it was made,
    how to load it."""
    t = manifest["totals"]
    cfg = manifest["config"]
    rejected = "\n".join(f"| {k} | {v} |" for k, v in t["rejected"].items()) or "| (none) | 0 |"
    teacher = manifest.get("teacher") or {}
    if "source" in cfg:  # distill traces import
        made = (f"Imported by `distill traces import` (format `{manifest['format']}`) from "
                f"`{cfg['source']['source']}`: its traces judged like teacher samples.")
        how = [f"- Source: `{json.dumps(cfg['source'])}` ({manifest.get('source_rows')} rows)",
               f"- Filters: `{json.dumps(cfg['filters'])}`",
               f"- Traces judged: {t['samples']}, kept: {t['records']}"]
    else:
        made = (f"Written by `distill generate` (format `{manifest['format']}`): teacher "
                "completions with their reasoning (inside `<think>`) and final answers, checked "
                "against reference answers.")
        how = [f"- Teacher: `{json.dumps(teacher)}`",
               f"- Sampling: `{json.dumps(cfg['sampling'])}`",
               f"- Filters: `{json.dumps(cfg['filters'])}`",
               f"- Prompts: {t['prompts']} ({cfg['prompts']['source']}), samples: "
               f"{t['samples']}, records kept: {t['records']}",
               f"- Tokens: {t['prompt_tokens']} prompt, {t['completion_tokens']} completion"]
    how_text = "\n".join(how)
    return f"""---
configs:
- config_name: default
  data_files: "data/*.parquet"
tags: [reasoning, distillation, distill]
---

# {name}: reasoning traces

{made}

{how_text}

| rejected because | samples |
|---|---|
{rejected}

```python
import datasets
ds = datasets.load_dataset("parquet", data_dir="{run_dir.as_posix()}/data")
```

Each shard's sha256 is in `manifest.json`; `distill.data.store.read_table(run_dir)` verifies them.
"""
