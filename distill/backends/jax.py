"""The in-process sampler (`kind: jax`): any `distill.load_pretrained` model (the DeepSeek-V3 MoE
or a dense model) sampled in batches by distill's own engine, optionally with top-k
log-probabilities."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal

from distill.chat import prompt_ids
from distill.config import Frozen, InputPath
from distill.data.records import PromptRecord, Sample
from distill.errors import DistillError
from distill.parallel import make_mesh, parse_mesh
from distill.pretrained import load_pretrained
from distill.sampling import DecodeModel, SamplingParams, generate, stop_ids
from distill.tokenizer import Tokenizer, tokenizer_identity


class JaxSamplerConfig(Frozen):
    """A model sampled in process. `model` is any MODEL path (HF directory, GGUF, preset YAML,
    student run); `tokenizer` overrides where the tokenizer is read from (needed for presets)."""

    kind: Literal["jax"] = "jax"
    model: InputPath
    tokenizer: InputPath | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = 16  # prompts per compiled generate call (each with n samples)
    mesh: str | None = None  # e.g. "data=1,fsdp=1,tensor=2,expert=4"; None: one device


def batch_seed(seed: int, first_prompt_id: str) -> int:
    """The PRNG seed of one batch: a function of the run seed and the batch's first prompt only,
    so a resumed run draws exactly what an uninterrupted one did."""
    digest = hashlib.sha256(f"{seed}:{first_prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class JaxSampler:
    """Samples completions from a model loaded in this process (a `Sampler`)."""

    def __init__(self, cfg: JaxSamplerConfig):
        self.cfg = cfg
        mesh = make_mesh(parse_mesh(cfg.mesh)) if cfg.mesh else None
        self.model, tokenizer = load_pretrained(cfg.model, param_dtype=cfg.dtype, mesh=mesh)
        if cfg.tokenizer:
            tokenizer = Tokenizer.from_pretrained(cfg.tokenizer)
        if tokenizer is None:
            raise DistillError(f"{cfg.model}: no tokenizer next to the model; set teacher.tokenizer")
        if not tokenizer.chat_template:
            raise DistillError(f"{cfg.model}: the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.eos_ids = stop_ids(self.model, tokenizer)
        self.decoder = DecodeModel(self.model)  # prepared once for every batch
        self.identity = {"kind": "jax", "model": cfg.model, "dtype": cfg.dtype,
                         "architecture": type(self.model.config).__name__,
                         "family": self.model.config.family}
        self.tokenizer_identity = tokenizer_identity(tokenizer, cfg.tokenizer or cfg.model)

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
                 on_sample: Callable[[Sample], None] | None = None) -> list[list[Sample]]:
        """`params.n` samples for each prompt, in order; batches of `batch_size` prompts."""
        out: list[list[Sample]] = []
        bs = self.cfg.batch_size
        for start in range(0, len(prompts), bs):
            batch = prompts[start:start + bs]
            ids = [self.prompt_ids(p, system) for p in batch]
            seeded = params.model_copy(update={"seed": batch_seed(params.seed, batch[0].id)})
            completions = generate(self.decoder, ids, seeded, self.eos_ids, self.tokenizer,
                                   pad_id=self.tokenizer.pad_token_id or 0)
            rows: list[list[Sample]] = [[] for _ in batch]
            for c in completions:
                s = Sample(sample_index=c.sample_index, completion=c.text,
                           finish_reason=c.finish_reason, prompt_tokens=len(ids[c.prompt_index]),
                           completion_tokens=len(c.token_ids), top_ids=c.top_ids,
                           top_logprobs=c.top_logprobs, **self._bytes(c))
                rows[c.prompt_index].append(s)
                if on_sample:
                    on_sample(s)
            out += rows
        return out

    def close(self) -> None:
        """Nothing to release: the model's buffers go with the object."""


def sample_text(model_path, prompt: str, params: SamplingParams, *, system=None, raw=False,
                dtype="float32", overrides=()) -> str:
    """Load MODEL, generate one completion for `prompt`, return its text (`distill sample`)."""
    model, tokenizer = load_pretrained(model_path, param_dtype=dtype, overrides=overrides)
    if tokenizer is None:
        raise DistillError(f"{model_path}: no tokenizer found next to the model")
    ids = prompt_ids(tokenizer, prompt, system, raw)
    [completion] = generate(model, [ids], params, stop_ids(model, tokenizer), tokenizer,
                            pad_id=tokenizer.pad_token_id or 0)
    return completion.text
