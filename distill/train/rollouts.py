"""On-policy rollouts: the student samples through the inference engine with its live weights,
the teacher scores the student's tokens, and the result is one training batch.

Dimension alphabet: R rows (prompts x group), L row length, K teacher entries per token, C the
completion tokens of one sample, S the aligned spans of one sample.

Which prompts and which random stream a step uses depend on the run's seed and the step's place
only (`schedule`, `prompt_order`, `sample_seed`), so a resumed run rolls out exactly what an
uninterrupted one did: the engine's samples are a function of (weights, prompt, seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence

import numpy as np

from distill.backends import make_scorer
from distill.backends.jax import JaxScorer
from distill.backends.spans import SpanScorer
from distill.chat import split_think
from distill.data.prompts import load_prompts
from distill.data.records import PromptRecord
from distill.errors import DistillError
from distill.inference import Engine
from distill.inference.engine import pow2_at_least
from distill.losses import TEACHER_FLOOR, Divergence
from distill.pretrained import load_pretrained
from distill.sampling import SamplingParams
from distill.tokenizer import Tokenizer
from distill.train.config import OnPolicyConfig
from distill.verify import answers_match, extract_answer

_NEG_INF = -np.inf
_LOG_FLOOR = float(np.log(TEACHER_FLOOR))


def _unit(*parts) -> float:
    """A uniform number in [0, 1) from the parts (a hash: the same on every process and run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def is_onpolicy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) is an on-policy one: GKD's lambda as a per-step
    draw from the run's seed (exactly every step at 1, none at 0)."""
    return fraction >= 1.0 or (fraction > 0.0 and _unit("onpolicy", seed, step) < fraction)


def onpolicy_before(seed: int, step: int, fraction: float) -> int:
    """How many of the steps before `step` were on-policy (where the prompt stream stands)."""
    return sum(is_onpolicy(seed, s, fraction) for s in range(step))


def prompt_order(seed: int, n: int, start: int, count: int) -> np.ndarray:
    """Indices of `count` prompts from position `start` of the prompt stream: the prompts in a
    fresh seeded permutation per pass over them."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in perms:  # one permutation per pass touched (a step spans at most two)
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(perms[epoch][i])
    return np.asarray(out)


def sample_seed(seed: int, step: int, prompt_id: str) -> int:
    """The engine seed of one prompt's group at one step (the engine adds the sample index)."""
    return int(_unit("rollout", seed, step, prompt_id) * 2**31)


@dataclasses.dataclass
class Rollout:
    """One on-policy step's batch (host arrays [R, L] / [R, L, K]) and what it measured."""

    batch: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclasses.dataclass
class _Sample:
    prompt: int  # index into the prompt list
    ids: list[int]  # the completion, its end-of-sequence id included when it stopped
    logprobs: np.ndarray  # float32 [C]: the sampler's log-probability of each token


class Rollouts:
    """The rollout engine, the teacher and the prompt stream of an on-policy run.

    model / tokenizer: the student (the engine is built on it; `set_weights` swaps its weights);
    mesh: the student's mesh (an in-process teacher without a mesh of its own goes on it too)."""

    def __init__(self, cfg: OnPolicyConfig, model, tokenizer: Tokenizer, seed: int, mesh,
                 source: str = "onpolicy"):
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.prompts: list[PromptRecord] = load_prompts(cfg.prompts)
        self.ids = [self._render(tokenizer, p) for p in self.prompts]
        self.scorer, teacher_tok = _open_teacher(cfg, mesh, source)
        if not isinstance(self.scorer, JaxScorer):  # a server that cannot score says so now
            probe = teacher_tok.encode("1 + 1 = 2", add_special_tokens=False)
            self.scorer.score([probe[:1]], [probe[1:]])
        self.teacher_vocab = self.scorer.vocab_size or teacher_tok.vocab_size
        self.same_vocabulary = teacher_tok.vocabulary_fingerprint() == \
            tokenizer.vocabulary_fingerprint()
        self.loss = resolve_loss(cfg, self.same_vocabulary, isinstance(self.scorer, JaxScorer),
                                 source)
        self.spans = None
        if not self.same_vocabulary:
            self.spans = SpanScorer(self.scorer, teacher_tok, tokenizer)
        longest = max(len(i) for i in self.ids)
        self.seq_len = -(-(longest + cfg.max_new_tokens) // 16) * 16
        limit = model.config.max_position_embeddings
        if longest + cfg.max_new_tokens > limit:
            raise DistillError(f"{source}: the longest prompt ({longest} tokens) plus "
                               f"max_new_tokens {cfg.max_new_tokens} is past the student's "
                               f"{limit} positions")
        self.engine = Engine(model, tokenizer, cfg.engine.model_copy(
            update={"max_len": min(pow2_at_least(longest + cfg.max_new_tokens), limit)}))
        self.vocab = model.config.vocab_size

    def _render(self, tokenizer: Tokenizer, prompt: PromptRecord) -> list[int]:
        text = tokenizer.apply_chat_template(prompt.messages(self.cfg.system),
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def divergence(self) -> Divergence | None:
        """The full-distribution term of the on-policy loss (None: the sampled estimate alone)."""
        if self.loss == "sampled_reverse_kl":
            return None
        return Divergence(kind=self.loss, beta=self.cfg.beta, tail=True)

    def close(self) -> None:
        self.scorer.close()

    # -- one step

    def make(self, step: int, k: int, weights) -> Rollout:
        """The batch of on-policy step `step`, the `k`-th on-policy step of the run (0-based),
        sampled with `weights` (the student's parameters, an nnx.State)."""
        t0 = time.perf_counter()
        picked = prompt_order(self.seed, len(self.prompts), k * self.cfg.prompts_per_step,
                              self.cfg.prompts_per_step)
        samples = self._sample(step, picked, weights)
        t1 = time.perf_counter()
        batch, kl, scored = self._score(samples)
        t2 = time.perf_counter()
        rewards = self._rewards(samples)
        batch["advantages_bt"] = batch["advantages_bt"] + self._reward_advantage(
            rewards, batch["loss_mask_bt"])
        lengths = [len(s.ids) for s in samples]
        return Rollout(batch, {"rollout_s": t1 - t0, "score_s": t2 - t1,
                               "completion_tokens": float(np.mean(lengths)),
                               "sampled_reverse_kl": kl, "reward": float(np.mean(rewards)),
                               "scored_share": scored / max(sum(lengths), 1)})

    def _sample(self, step: int, picked: np.ndarray, weights) -> list[_Sample]:
        self.engine.set_weights(weights)
        params = SamplingParams(n=self.cfg.group_size, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=self.cfg.max_new_tokens, logprobs=1)
        reqs = [self.engine.submit(self.ids[i], params.model_copy(update={
            "seed": sample_seed(self.seed, step, self.prompts[i].id)})) for i in picked]
        self.engine.run_until_idle()
        out = []
        for i, req in zip(picked, reqs, strict=True):
            req.wait()
            for j in range(self.cfg.group_size):
                lps = np.asarray([r[0] for r in req.logprobs[j]], np.float32)
                out.append(_Sample(int(i), list(req.tokens[j]), lps[:len(req.tokens[j])]))
        return out

    def _score(self, samples: list[_Sample]) -> tuple[dict[str, np.ndarray], float, float]:
        """The batch's rows with the teacher's verdict, the sampled reverse KL (per scored
        token) and how many completion tokens the teacher scored (across tokenizers: those in
        an aligned span)."""
        rows = _Rows(len(samples), self.seq_len)
        full = self.divergence() is not None
        if self.spans is None:
            scores = self._teacher_scores(samples, (self.cfg.top_k or None) if full else 0)
            spans = [(np.arange(len(s.ids), dtype=np.int32), _floored(sc.logprobs))
                     for s, sc in zip(samples, scores, strict=True)]
        else:
            scores = None
            spans = [(sc.span_of_token, _floored(sc.teacher_logprobs)) for sc in self.spans.score(
                [self.prompts[s.prompt] for s in samples], [s.ids for s in samples],
                self.cfg.system)]
        kl_sum = kl_tokens = 0.0
        for r, (s, (span_of, teacher_lp)) in enumerate(zip(samples, spans, strict=True)):
            student_lp = np.zeros(len(teacher_lp), np.float64)
            inside = span_of >= 0
            np.add.at(student_lp, span_of[inside], s.logprobs[inside])
            gap = teacher_lp - student_lp  # log q(span) - log p(span): minus the span's reverse KL
            # (a sample with no span, e.g. text the teacher's normalizer rewrote: none trained)
            adv = np.where(inside, gap[np.maximum(span_of, 0)], 0.0) if len(gap) else \
                np.zeros(len(span_of))
            rows.put(r, self.ids[s.prompt], s.ids, s.logprobs, inside,
                     np.zeros_like(adv) if full else adv)
            if full:
                rows.put_teacher(r, len(self.ids[s.prompt]), scores[r], self.vocab,
                                 whole=not self.cfg.top_k)
            kl_sum -= float(gap.sum())
            kl_tokens += float(inside.sum())
        return rows.arrays(full), kl_sum / max(kl_tokens, 1.0), kl_tokens

    def _teacher_scores(self, samples: list[_Sample], top_k: int | None) -> list:
        """The teacher's scores of the samples (one tokenizer). An id past the teacher's
        vocabulary (a padding row of the student's embedding, which an untrained student may
        sample) is read by the teacher as id 0 and gets log-probability -inf (then the floor)."""
        unknown = [np.asarray(s.ids) >= self.teacher_vocab for s in samples]
        scores = self.scorer.score([self.ids[s.prompt] for s in samples],
                                   [np.where(u, 0, s.ids).tolist()
                                    for s, u in zip(samples, unknown, strict=True)], top_k=top_k)
        for sc, u in zip(scores, unknown, strict=True):
            sc.logprobs = np.where(u, -np.inf, sc.logprobs)
        return scores

    def _rewards(self, samples: list[_Sample]) -> np.ndarray:
        """1.0 where the sample's final answer matches its prompt's reference, else 0.0."""
        if self.cfg.reward_weight == 0.0:
            return np.zeros(len(samples), np.float32)
        eos = set(self.engine.eos_ids)
        out = []
        for s in samples:
            ids = s.ids[:-1] if s.ids and s.ids[-1] in eos else s.ids
            answer = split_think(self.tokenizer.decode(ids)).answer
            out.append(float(answers_match(extract_answer(answer), self.prompts[s.prompt].reference)))
        return np.asarray(out, np.float32)

    def _reward_advantage(self, rewards: np.ndarray, mask_rl: np.ndarray) -> np.ndarray:
        """reward_weight x (reward - its group's mean) on every completion token of a row."""
        g = self.cfg.group_size
        centred = rewards - rewards.reshape(-1, g).mean(axis=1).repeat(g)
        return (self.cfg.reward_weight * centred)[:, None] * mask_rl


def _floored(logprobs: np.ndarray) -> np.ndarray:
    """The teacher's log-probabilities with `TEACHER_FLOOR` under them: a token the teacher cannot
    produce (an id past its vocabulary: NaN or -inf from a scorer) costs a large finite amount."""
    lp = np.nan_to_num(np.asarray(logprobs, np.float64), nan=-np.inf)
    return np.maximum(lp, _LOG_FLOOR)


class _Rows:
    """The host arrays of one on-policy batch, filled row by row."""

    def __init__(self, r: int, length: int):
        self.r, self.length = r, length
        self.tokens = np.zeros((r, length), np.int32)
        self.targets = np.zeros((r, length), np.int32)
        self.mask = np.zeros((r, length), np.float32)
        self.segments = np.zeros((r, length), np.int32)
        self.old = np.zeros((r, length), np.float32)
        self.adv = np.zeros((r, length), np.float32)
        self.top_ids = self.top_lps = None

    def put(self, r: int, prompt: Sequence[int], completion: Sequence[int], lps: np.ndarray,
            trained: np.ndarray, adv: np.ndarray) -> None:
        """Row r: the prompt then the completion; targets at the completion's tokens."""
        seq = np.asarray([*prompt, *completion], np.int32)
        n, p, c = len(seq) - 1, len(prompt), len(completion)
        self.tokens[r, :n], self.targets[r, :n], self.segments[r, :n] = seq[:-1], seq[1:], 1
        at = slice(p - 1, p - 1 + c)  # the positions whose targets are the completion's tokens
        self.mask[r, at] = trained
        self.old[r, at] = lps
        self.adv[r, at] = adv

    def put_teacher(self, r: int, prompt_len: int, score, vocab: int, whole: bool) -> None:
        """The teacher's entries at row r's completion positions: its top-k, or with `whole` its
        whole distribution laid over the student's `vocab` ids (an id the teacher has not gets
        `TEACHER_FLOOR`; one the student has not is left out), so no tail class is left to
        rounding (1 - the sum of a whole float32 distribution is noise)."""
        ids, lps = score.top_ids, score.top_logprobs
        if ids is None:
            raise DistillError("the teacher returned no top-k entries for a full-distribution "
                               "loss; use onpolicy.loss sampled_reverse_kl")
        if whole:
            both = min(vocab, lps.shape[-1])
            lps = np.concatenate([lps[:, :both], np.full((len(lps), vocab - both), _LOG_FLOOR,
                                                         np.float32)], axis=-1)
            ids = np.broadcast_to(np.arange(vocab, dtype=np.int32), lps.shape)
        if self.top_ids is None:
            k = ids.shape[-1]
            self.top_ids = np.zeros((self.r, self.length, k), np.int32)
            self.top_lps = np.full((self.r, self.length, k), _NEG_INF, np.float32)
        at = slice(prompt_len - 1, prompt_len - 1 + len(ids))
        self.top_ids[r, at] = np.where(ids < vocab, ids, vocab)  # an id past the student's: none
        self.top_lps[r, at] = lps

    def arrays(self, full: bool) -> dict[str, np.ndarray]:
        positions = np.broadcast_to(np.arange(self.length, dtype=np.int32), self.tokens.shape)
        out = {"tokens_bt": self.tokens, "targets_bt": self.targets, "loss_mask_bt": self.mask,
               "segment_ids_bt": self.segments, "positions_bt": np.array(positions),
               "old_logprobs_bt": self.old, "advantages_bt": self.adv}
        if full:
            out["top_ids_btk"], out["top_logprobs_btk"] = self.top_ids, self.top_lps
        return out


def resolve_loss(cfg: OnPolicyConfig, same_vocabulary: bool, in_process: bool,
                 source: str) -> str:
    """The on-policy loss `auto` stands for, or a one-line error where the chosen one cannot
    run: the full-distribution losses need the teacher's distribution over the student's ids."""
    if cfg.loss == "auto":
        return "reverse_kl" if same_vocabulary and in_process else "sampled_reverse_kl"
    if cfg.loss != "sampled_reverse_kl" and not same_vocabulary:
        raise DistillError(f"{source}: onpolicy.loss {cfg.loss} compares the teacher's and the "
                           "student's distributions id by id, and their tokenizers differ; use "
                           "sampled_reverse_kl (scored on byte-aligned spans)")
    return cfg.loss


def _open_teacher(cfg: OnPolicyConfig, mesh, source: str):
    """(scorer, the teacher's tokenizer). An in-process teacher without a mesh of its own is
    loaded onto the student's mesh; a served one must name its tokenizer (whether it shares the
    student's vocabulary decides how its scores are read)."""
    t = cfg.teacher
    if t.kind == "jax" and t.mesh is None:
        model, tok = load_pretrained(t.model, param_dtype=t.dtype, mesh=mesh)
        if t.tokenizer:
            tok = Tokenizer.from_pretrained(t.tokenizer)
        if tok is None:
            raise DistillError(f"{source}: {t.model} has no tokenizer; set onpolicy.teacher."
                               "tokenizer")
        return JaxScorer(t, model=model, tokenizer=tok), tok
    if t.kind == "jax":  # on a mesh of its own
        scorer = JaxScorer(t)
        return scorer, scorer.tokenizer
    if t.tokenizer is None:
        raise DistillError(f"{source}: onpolicy.teacher.tokenizer is needed for a served teacher "
                           "(the served model's tokenizer: whether it shares the student's "
                           "vocabulary decides how its scores are read)")
    return make_scorer(t), Tokenizer.from_pretrained(t.tokenizer)
