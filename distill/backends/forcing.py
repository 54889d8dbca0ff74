"""Budget forcing (s1, Muennighoff et al. 2025), on the host, for any backend that continues given
tokens (an `Extender`: in process through the engine, served through `/v1/completions`).

`Forcing(budget=N)`: a sample still inside its think block after N thinking tokens has the block
closed as the chat template writes it (the reasoning without trailing newlines, then
`distill.chat.think_end`, "\\n</think>\\n\\n"), followed by
`answer_prefix` (s1 appends "Final Answer:"; default none), and goes on to answer with what is
left of max_new_tokens. `Forcing(min_thinking=N, wait="Wait")`: a sample that closes its think
block before N thinking tokens has the `</think>` replaced by the wait text and thinks on.

A sample runs in rounds, all samples of a call together: each round continues every unfinished
sample from the prompt and its text so far, tokenized as one text (the template's rendering, so
an inserted close or wait merges with what precedes it as the model would see it in training);
thinking rounds stop at the budget, answer rounds at max_new_tokens. The stored completion is
the whole text (inserted parts included); `Sample.thinking` records the thinking tokens, whether
the close was forced and how many waits were inserted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from distill.backends.base import Extender, Piece, Sampler
from distill.chat import THINK_CLOSE, has_think_block, prompt_opens_think, think_end, think_parts
from distill.data.records import PromptRecord, Sample, Thinking
from distill.errors import DistillError
from distill.sampling import SamplingParams, sample_seed

SLACK_TOKENS = 16  # a text so far may tokenize a few tokens longer than it was sampled


@dataclasses.dataclass(frozen=True)
class Forcing:
    """How long samples think: `budget` (end the thinking at N tokens, then `answer_prefix`;
    None: no end) and `min_thinking` (suppress an end before N tokens, appending `wait`; None:
    never)."""

    budget: int | None = None
    min_thinking: int | None = None
    wait: str = "Wait"
    answer_prefix: str = ""


@dataclasses.dataclass
class _Run:
    """One sample being forced: its prompt's rendering, the text so far (generated and
    inserted), its tokens, thinking tokens, and where it stands."""

    k: int  # the prompt's position in the call
    prompt: PromptRecord
    prompt_text: str
    index: int
    text: str = ""
    tokens: int = 0
    thinking: int = 0
    forced: bool = False
    waits: int = 0
    phase: int = 0
    answering: bool = False
    finish: str | None = None  # set when the sample is done


class BudgetForced:
    """A `Sampler` whose samples think within `forcing`'s bounds, over an `Extender` backend.
    `name` names the model in errors. A backend without a tokenizer, or whose chat template has
    no think block, is a DistillError here, before anything is sampled."""

    def __init__(self, sampler: Sampler, forcing: Forcing, name: str):
        tokenizer = getattr(sampler, "tokenizer", None)
        if not isinstance(sampler, Extender) or tokenizer is None:
            raise DistillError(f"{name}: a thinking budget needs the model's tokenizer to render "
                               "its prompts and count thinking tokens (set tokenizer: in its entry)")
        if not tokenizer.chat_template or not has_think_block(tokenizer):
            raise DistillError(f"{name}: the chat template has no think block "
                               f"(<think>...</think>); a thinking budget needs one")
        self.sampler, self.forcing, self.tokenizer = sampler, forcing, tokenizer
        self.end = think_end(tokenizer)
        self.identity = sampler.identity
        self.tokenizer_identity = sampler.tokenizer_identity

    def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def complete(self, prompts: list[PromptRecord], params: SamplingParams,
                 system: str | None = None,
                 on_sample: Callable[[int, Sample], None] | None = None,
                 indices: Sequence[Sequence[int]] | None = None) -> list[list[Sample]]:
        """Forced samples per prompt, in index order (a `Sampler`: `indices`, per prompt, the
        sample indices to make, default 0..n-1); `on_sample(k, sample)` sees each as it ends."""
        texts = [self.tokenizer.apply_chat_template(p.messages(system), add_generation_prompt=True)
                 for p in prompts]
        wanted = indices if indices is not None else [range(params.n)] * len(prompts)
        runs = [_Run(k, p, text, i)
                for k, (p, text, ids) in enumerate(zip(prompts, texts, wanted, strict=True))
                for i in ids]
        out: list[list[Sample]] = [[] for _ in prompts]
        active, reserve = runs, 0
        while active:
            ids = [self.tokenizer.encode(r.prompt_text + r.text, add_special_tokens=False)
                   for r in active]
            # room for the longest sample in every round (a re-tokenized text may run longer)
            reserve = reserve or max(map(len, ids)) + params.max_new_tokens + SLACK_TOKENS
            asks = [self._params(r, params) for r in active]
            for run, piece in zip(active, self.sampler.extend(ids, asks, reserve), strict=True):
                self._step(run, piece, params.max_new_tokens)
                if run.finish is not None:
                    sample = self._sample(run)
                    out[run.k].append(sample)
                    if on_sample is not None:
                        on_sample(run.k, sample)
            active = [r for r in active if r.finish is None]
        return [sorted(group, key=lambda s: s.sample_index) for group in out]

    def _params(self, run: _Run, params: SamplingParams) -> SamplingParams:
        """The next round's settings: to the budget while thinking, else to max_new_tokens."""
        left = params.max_new_tokens - run.tokens
        if not run.answering and self.forcing.budget is not None:
            left = min(left, self.forcing.budget - run.thinking)
        return params.model_copy(update={
            "n": 1, "max_new_tokens": left, "stop": (), "logprobs": 0,
            "seed": sample_seed(params.seed, run.prompt.id, run.index, run.phase)})

    def _step(self, run: _Run, piece: Piece, max_new: int) -> None:
        """Take one round's piece into the run: go on thinking, insert a wait or the close,
        answer, or end."""
        run.phase += 1
        before, run.text = run.text, run.text + piece.text
        run.tokens += piece.tokens
        if run.answering:
            return self._answer_or_end(run, piece, max_new)
        reasoning, answer = think_parts(run.text, prompt_opens_think(run.prompt_text))
        if reasoning is None:  # no think block at all (a template the model need not open)
            run.answering = True
            return self._answer_or_end(run, piece, max_new)
        if answer is None:  # still thinking
            run.thinking += piece.tokens
            if piece.finish_reason == "stop" or run.tokens >= max_new:
                run.finish = "stop" if piece.finish_reason == "stop" else "length"
            elif self.forcing.budget is not None and run.thinking >= self.forcing.budget:
                # templates render reasoning without its trailing newlines, then the close
                run.text = run.text[:len(run.text) - len(reasoning)] + reasoning.rstrip("\n")
                self._insert(run, self.end + self.forcing.answer_prefix, max_new)
                run.forced = run.answering = True
            return None
        cut = len(run.text) - len(answer) - len(THINK_CLOSE)  # where this round's `</think>` is
        thought = self._count(run.text[len(before):cut])
        run.thinking += thought
        if self.forcing.min_thinking is not None and run.thinking < self.forcing.min_thinking:
            run.text, run.tokens = run.text[:cut], run.tokens - piece.tokens + thought
            self._insert(run, self.forcing.wait, max_new)
            run.thinking, run.waits = run.thinking + self._count(self.forcing.wait), run.waits + 1
            return None
        run.answering = True
        return self._answer_or_end(run, piece, max_new)

    def _insert(self, run: _Run, text: str, max_new: int) -> None:
        """Append forced text (its tokens count against max_new_tokens)."""
        run.text += text
        run.tokens += self._count(text)
        if run.tokens >= max_new:
            run.finish = "length"

    @staticmethod
    def _answer_or_end(run: _Run, piece: Piece, max_new: int) -> None:
        if piece.finish_reason == "stop":
            run.finish = "stop"
        elif run.tokens >= max_new:
            run.finish = "length"

    def _sample(self, run: _Run) -> Sample:
        return Sample(sample_index=run.index, completion=run.text, finish_reason=run.finish,
                      prompt_tokens=self._count(run.prompt_text), completion_tokens=run.tokens,
                      thinking=Thinking(run.thinking, run.forced, run.waits))

    def close(self) -> None:
        """Close the backend."""
        self.sampler.close()


def budget_forced(sampler: Sampler, forcing: Forcing | None, name: str) -> Sampler:
    """`sampler` itself without forcing, else its samples forced (`BudgetForced`)."""
    return sampler if forcing is None else BudgetForced(sampler, forcing, name)
