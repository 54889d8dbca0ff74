"""The in-process sampler (`kind: jax`): any `distill.load_pretrained` model (the DeepSeek-V3 MoE
or a dense model) sampled through distill's inference engine (`distill.inference`), optionally
with top-k log-probabilities; and its scorer (`JaxScorer`), the model's log-probabilities on
given tokens.

A `complete` call submits every sample it is asked for to the engine at once (continuous batching
over the engine's slots), each as a request of its own (n = 1) with the seed
`distill.sampling.sample_seed(run seed, prompt id, sample index)`, the seed the HTTP backend asks
a server with. So a sample does not depend on what runs beside it: a resumed `distill generate`
or `distill eval`, or one with another slot count, samples the same completions. (A prompt's
samples are prefilled one by one rather than copied from one prefill: the prompt is short beside
what its samples decode.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from distill.backends.base import Piece
from distill.chat import prompt_ids
from distill.config import Frozen, InputPath
from distill.data.records import PromptRecord, Sample
from distill.errors import DistillError
from distill.inference import (
    Completion,
    Engine,
    EngineConfig,
    EngineError,
    Request,
    TokenScores,
    score_sequences,
    stop_ids,
)
from distill.inference.engine import pow2_at_least
from distill.parallel import make_mesh, parse_mesh
from distill.pretrained import load_pretrained
from distill.sampling import SamplingParams, sample_seed
from distill.tokenizer import Tokenizer, tokenizer_identity


class JaxSamplerConfig(Frozen):
    """A model sampled in process. `model` is any MODEL path (HF directory, GGUF, preset YAML,
    student run); `tokenizer` overrides where the tokenizer is read from (needed for presets);
    `engine` shapes the inference engine (`slots`: sequences decoded together; `max_len`: prompt
    plus completion tokens per sequence, default: the longest request so far rounded up to a
    power of two, within the model's context)."""

    kind: Literal["jax"] = "jax"
    model: InputPath
    tokenizer: InputPath | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    engine: EngineConfig = EngineConfig()
    mesh: str | None = None  # e.g. "data=1,fsdp=1,tensor=2,expert=4"; None: one device


def load_model(cfg: JaxSamplerConfig):
    """(model, tokenizer) a config names, the model placed on its mesh; a missing tokenizer is a
    DistillError."""
    mesh = make_mesh(parse_mesh(cfg.mesh)) if cfg.mesh else None
    model, tokenizer = load_pretrained(cfg.model, param_dtype=cfg.dtype, mesh=mesh)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_pretrained(cfg.tokenizer)
    if tokenizer is None:
        raise DistillError(f"{cfg.model}: no tokenizer next to the model; set teacher.tokenizer")
    return model, tokenizer


def model_identity(cfg: JaxSamplerConfig, model) -> dict:
    """What traces and runs record of an in-process model."""
    return {"kind": "jax", "model": cfg.model, "dtype": cfg.dtype,
            "architecture": type(model.config).__name__, "family": model.config.family}


class JaxSampler:
    """Samples completions from a model loaded in this process (a `Sampler`)."""

    def __init__(self, cfg: JaxSamplerConfig):
        self.cfg = cfg
        self.model, tokenizer = load_model(cfg)
        if not tokenizer.chat_template:
            raise DistillError(f"{cfg.model}: the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.eos_ids = stop_ids(self.model, tokenizer)
        self._engine: Engine | None = None  # built on first use, sized to the requests
        self.identity = model_identity(cfg, self.model)
        self.tokenizer_identity = tokenizer_identity(tokenizer, cfg.tokenizer or cfg.model)

    def engine(self, tokens: int) -> Engine:
        """The engine, able to hold `tokens` per sequence where the model's context allows: built
        on first use and, when `engine.max_len` is not set, rebuilt larger for a longer request
        (its programs compile again)."""
        eng, shape = self._engine, self.cfg.engine
        max_len = shape.max_len or min(pow2_at_least(max(tokens, 2)),
                                       self.model.config.max_position_embeddings)
        if eng is None or max_len > eng.max_len:
            self._engine = None  # let the old KV cache go before the new one is allocated
            eng = self._engine = Engine(self.model, self.tokenizer,
                                        shape.model_copy(update={"max_len": max_len}), self.eos_ids)
        return eng

    def _bytes(self, c) -> dict:
        """The sampled tokens' and the top-k entries' bytes (with logprobs asked for)."""
        if c.top_ids is None:
            return {}
        table = self.tokenizer.token_bytes()
        return {"token_bytes": [table[i] for i in c.token_ids],
                "top_bytes": [[table[i] for i in row] for row in c.top_ids]}

    def prompt_ids(self, prompt: PromptRecord, system: str | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(prompt.messages(system), add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def complete(self, prompts: list[PromptRecord], params: SamplingParams,
                 system: str | None = None,
                 on_sample: Callable[[int, Sample], None] | None = None,
                 indices: Sequence[Sequence[int]] | None = None) -> list[list[Sample]]:
        """`params.n` samples for each prompt (or those of `indices`), in order (see
        `Sampler.complete`), all submitted to the engine at once, one request each;
        `on_sample(k, sample)` sees each sample as it ends. A prompt the engine cannot take (too
        long for its limit) is an EngineError naming it, before any sampling."""
        wanted = indices if indices is not None else [range(params.n)] * len(prompts)
        asked = [k for k, w in enumerate(wanted) if len(w)]
        out: list[list[Sample]] = [[] for _ in prompts]
        if not asked:
            return out
        ids = {k: self.prompt_ids(prompts[k], system) for k in asked}
        one = params.model_copy(update={"n": 1})
        eng = self.engine(max(map(len, ids.values())) + params.max_new_tokens)
        for k in asked:
            try:
                eng.check(len(ids[k]), one)
            except EngineError as e:
                raise EngineError(f"prompt {prompts[k].id}: {e}") from None

        def done(k: int, index: int, req: Request) -> None:
            if req.error is not None:
                return  # complete() raises it
            sample = self._sample(req.completions[0], len(ids[k]), index)
            out[k].append(sample)
            if on_sample is not None:
                on_sample(k, sample)

        try:
            reqs = [eng.submit(ids[k], one.model_copy(update={
                        "seed": sample_seed(params.seed, prompts[k].id, i)}),
                        on_done=lambda req, k=k, i=i: done(k, i, req))
                    for k in asked for i in wanted[k]]
            eng.run_until_idle()
            for req in reqs:
                req.wait(0)  # raises a failed request's error
        except BaseException:
            self._engine = None  # requests may be left in its slots: start afresh next time
            raise
        return [sorted(group, key=lambda s: s.sample_index) for group in out]

    def extend(self, prefixes, params, reserve: int = 0) -> list[Piece]:
        """One sample continuing each prefix (token ids), all submitted to the engine at once,
        the engine sized for `reserve` tokens at least (an `Extender`: budget forcing's
        rounds)."""
        if not prefixes:
            return []
        eng = self.engine(max(reserve, *(len(row) + q.max_new_tokens
                                         for row, q in zip(prefixes, params, strict=True))))
        try:
            reqs = [eng.submit(row, q.model_copy(update={"n": 1}))
                    for row, q in zip(prefixes, params, strict=True)]
            eng.run_until_idle()
            done = [req.wait(0)[0] for req in reqs]
        except BaseException:
            self._engine = None  # requests may be left in its slots: start afresh next time
            raise
        return [Piece(c.text, len(c.token_ids), c.finish_reason) for c in done]

    def _sample(self, c: Completion, prompt_tokens: int, index: int) -> Sample:
        return Sample(sample_index=index, completion=c.text,
                      finish_reason=c.finish_reason, prompt_tokens=prompt_tokens,
                      completion_tokens=len(c.token_ids), top_ids=c.top_ids,
                      top_logprobs=c.top_logprobs, **self._bytes(c))

    def close(self) -> None:
        """Let the engine's KV cache go now (the model's buffers go with the object)."""
        self._engine = None


class JaxScorer:
    """A model in this process scoring tokens it is handed (a `Scorer`), through
    `distill.inference.score_sequences`: the whole vocabulary is available. `model` (and its
    `tokenizer`) may be one already loaded, e.g. placed on the student's mesh; otherwise the
    config's is loaded as `JaxSampler` loads it. `batch_rows`: sequences per forward."""

    def __init__(self, cfg: JaxSamplerConfig, *, model=None, tokenizer=None,
                 batch_rows: int = 8):
        self.cfg = cfg
        if model is None:
            model, loaded = load_model(cfg)
            tokenizer = tokenizer or loaded
        self.model, self.tokenizer, self.batch_rows = model, tokenizer, batch_rows
        self.identity = model_identity(cfg, model)
        self.tokenizer_identity = (None if tokenizer is None else
                                   tokenizer_identity(tokenizer, cfg.tokenizer or cfg.model))
        self.vocab_size = model.config.vocab_size

    def score(self, prompts, completions, top_k: int | None = 0) -> list[TokenScores]:
        """See `distill.inference.score_sequences`."""
        return score_sequences(self.model, prompts, completions, top_k,
                               batch_rows=self.batch_rows)

    def close(self) -> None:
        """Nothing to release beyond the model, which goes with the object."""


def sample_text(model_path, prompt: str, params: SamplingParams, *, system=None, raw=False,
                dtype="float32", overrides=()) -> str:
    """Load MODEL, generate one completion for `prompt` through a one-slot engine sized to it,
    return its text (`distill sample`). EngineError when the prompt and budget pass the model's
    context."""
    model, tokenizer = load_pretrained(model_path, param_dtype=dtype, overrides=overrides)
    if tokenizer is None:
        raise DistillError(f"{model_path}: no tokenizer found next to the model")
    ids = prompt_ids(tokenizer, prompt, system, raw)
    engine = Engine(model, tokenizer,
                    EngineConfig(slots=1, max_len=max(len(ids) + params.max_new_tokens, 2)))
    [completion] = engine.generate([ids], params)
    return completion.text
