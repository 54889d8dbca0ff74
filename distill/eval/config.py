"""The `distill eval` config: held-out prompts, the models to compare, the sampling protocol.

```yaml
name: qwen-1.5b-vs-r1            # default: the config file's stem
prompts: {source: synthetic, split: heldout, heldout_fraction: 0.2}
# or a standard benchmark instead of prompts (its template, answer reading, n and token budget):
# benchmark: {name: math500, source: null, limit: null}
models:
  - {name: student, model: students/qwen-1.5b}            # kind jax (default): in process
  - {name: r1, role: teacher, kind: openai, base_url: http://127.0.0.1:8000/v1, model: r1}
protocol: {n: 4, temperature: 0.6, top_p: 0.95, max_new_tokens: 4096, seed: 0, greedy: true,
           answer_reading: strict}   # open-r1 (lighteval's, the benchmarks' default) | strict
answer_pattern: null             # regex with one group, used by strict when there is no \\boxed{}
kl: {traces: teacher_traces/r1-math, max_samples: 64}
output: null                     # default: students/eval/<name>
```

A model entry is a sampler config as `distill generate`'s teacher is (`kind: jax` with any MODEL
path, or `kind: openai`: `distill.backends`) plus `name` (default: the model path's last part),
`role` (student | teacher; at most one teacher) and `metrics` (a metrics.jsonl for the loss-curve
plot; a students/<run> model uses its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.backends import sampler_union
from distill.backends.forcing import Forcing
from distill.config import DataSource, Frozen, InputPath, OutputPath
from distill.data.benchmarks import benchmark
from distill.data.prompts import PromptsConfig
from distill.data.traces import TraceSpec
from distill.errors import DistillError
from distill.sampling import NewTokens, Samples, SamplingFields, SystemPrompt, Temperature, TopP
from distill.verify import AnswerPattern


class EntryFields(Frozen):
    """What an evaluated model adds to its backend's config table: `name` (default: the model
    path's last part), `role` (at most one teacher) and `metrics` (the loss-curve plot)."""

    name: str | None = None
    role: Literal["student", "teacher"] = "student"
    metrics: InputPath | None = None  # metrics.jsonl of the model's training run (loss-curve plot)


# A `models` entry: any backend's table (kind jax by default: in process, a students/<run>
# directory included) plus the entry fields.
ModelEntry = sampler_union(EntryFields)


class ProtocolConfig(SystemPrompt, SamplingFields):
    """How every model is sampled (the shared sampling table, `distill.sampling`). Defaults:
    DeepSeek-R1's evaluation protocol (n samples per prompt at temperature 0.6, top-p 0.95, pass@1
    averaged over them), except the token budget: R1 allowed 32768 tokens; 4096 keeps an
    in-process KV cache modest (raise it for long traces). `params()` gives the engine's
    settings."""

    n: Samples = 4
    temperature: Temperature = 0.6
    top_p: TopP = 0.95
    max_new_tokens: NewTokens = 4096
    greedy: bool = True  # one extra greedy (temperature 0) sample per prompt
    # how a completion's answer is read (`distill.data.benchmarks`): open-r1, lighteval's reading
    # at open-r1's pin over the whole completion (and GPQA's layout there), the benchmarks'
    # default; strict, the last \boxed{} (or anchored letter) after </think>, the prompts' default
    answer_reading: Literal["open-r1", "strict"] = "strict"
    # budget forcing (s1; `distill.backends.forcing`): end the thinking at N tokens (then write
    # answer_prefix, e.g. s1's "Final Answer:"), or suppress an end before N tokens by appending
    # `wait`
    thinking_budget: int | None = Field(None, ge=1)
    min_thinking: int | None = Field(None, ge=1)
    wait: str = Field("Wait", min_length=1)
    answer_prefix: str = ""

    @model_validator(mode="after")
    def _thinking_bounds(self) -> ProtocolConfig:
        budget = self.thinking_budget
        if budget is not None and budget >= self.max_new_tokens:
            raise ValueError(f"thinking_budget {budget} leaves no room to answer within "
                             f"max_new_tokens {self.max_new_tokens}; give a smaller budget or "
                             "raise max_new_tokens")
        if budget is not None and self.min_thinking is not None and self.min_thinking >= budget:
            raise ValueError(f"min_thinking {self.min_thinking} must be below thinking_budget "
                             f"{budget}")
        return self

    def forcing(self) -> Forcing | None:
        """The budget forcing this protocol asks for (None: sample plainly)."""
        if self.thinking_budget is None and self.min_thinking is None:
            return None
        return Forcing(self.thinking_budget, self.min_thinking, self.wait, self.answer_prefix)


class KLConfig(Frozen):
    """Per-token agreement with the teacher on its traces (see `distill.eval.agreement`).

    traces: a trace source as in `data.traces` (a teacher_traces/<run>, files, a hub name or a
    TraceSource table): KL and top-1 agreement where its rows carry the teacher's top-k
    log-probabilities, else each student's NLL and top-1 agreement on the trace text.
    tokenizer: where the teacher's tokenizer is (default: the teacher entry's model, else the
    model the traces' manifest names). only_eval_prompts: use only traces of the evaluated prompts
    (held out from training when the prompts are).
    """

    traces: TraceSpec
    max_samples: int = Field(64, ge=1)
    tokenizer: InputPath | None = None
    only_eval_prompts: bool = True


class BenchmarkConfig(Frozen):
    """A standard benchmark as the prompt set (`distill.data.benchmarks`): its prompt template,
    answer reading and R1 protocol (n, token budget: defaults of `protocol` that the config
    leaves unset). `source`: a local copy instead of the hub; `limit`: the first N problems."""

    name: str
    source: DataSource | None = None
    limit: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            return benchmark(name).name
        except DistillError as e:
            raise ValueError(str(e)) from None


class EvalConfig(Frozen):
    """A `distill eval` config (see the module docstring)."""

    name: str | None = None
    prompts: PromptsConfig | None = None  # or a benchmark
    benchmark: BenchmarkConfig | None = None
    models: list[ModelEntry] = Field(min_length=1)
    protocol: ProtocolConfig = ProtocolConfig()
    answer_pattern: AnswerPattern = None
    kl: KLConfig | None = None
    output: OutputPath | None = None  # the report directory; default students/eval/<name>


    @model_validator(mode="before")
    @classmethod
    def _benchmark_protocol(cls, data):
        """A benchmark's n, token budget and answer reading (open-r1) fill what `protocol`
        leaves unset."""
        bench = data.get("benchmark") if isinstance(data, dict) else None
        name = bench.get("name") if isinstance(bench, dict) else None
        if not isinstance(name, str) or not isinstance(data.get("protocol", {}), dict):
            return data
        try:
            b = benchmark(name)
        except DistillError:
            return data  # the field validator names it
        protocol = {"n": b.n, "max_new_tokens": b.max_new_tokens, "answer_reading": "open-r1",
                    **data.get("protocol", {})}
        return {**data, "protocol": protocol}

    @model_validator(mode="after")
    def _pattern_is_strict(self) -> EvalConfig:
        if self.answer_pattern is not None and self.protocol.answer_reading != "strict":
            raise ValueError("answer_pattern goes with protocol.answer_reading: strict (open-r1 "
                             "reads answers by lighteval's own rules)")
        return self

    @model_validator(mode="after")
    def _one_prompt_set(self) -> EvalConfig:
        if (self.prompts is None) == (self.benchmark is None):
            raise ValueError("give either prompts or benchmark (exactly one)")
        return self

    @model_validator(mode="after")
    def _names_and_roles(self) -> EvalConfig:
        names = [model_name(m) for m in self.models]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"two models are named {dup!r}; give each a distinct name")
        if sum(m.role == "teacher" for m in self.models) > 1:
            raise ValueError("more than one model has role: teacher (at most one)")
        return self


def model_name(entry) -> str:
    """The entry's name, or the last part of its model path / served model name."""
    return entry.name or Path(entry.model.rstrip("/")).name or entry.model


def benchmark_config(name: str, model: str, *, model_name: str | None = None,
                     served_name: str | None = None, source: str | None = None,
                     limit: int | None = None) -> dict:
    """The eval config of `distill eval --benchmark NAME --model MODEL`: one model (a MODEL path
    in process, or an http(s) URL of an OpenAI-compatible server serving `served_name`) on one
    benchmark with its R1 protocol."""
    if model.startswith(("http://", "https://")):
        entry = {"kind": "openai", "base_url": model, "model": served_name}
        shown = model_name or served_name
    else:
        entry = {"kind": "jax", "model": model}
        shown = model_name or Path(model.rstrip("/")).name
    entry["name"] = shown
    return {"name": f"{benchmark(name).name}-{shown}".replace("/", "-"),
            "benchmark": {"name": name, "source": source, "limit": limit}, "models": [entry]}

