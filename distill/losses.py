"""Training losses: pure functions of logits, next-token targets, loss masks and the teacher's stored
top-k log-probabilities, computed in float32 and returning `(loss, metrics)`.

Dimension alphabet: B batch, T sequence, D model width, V vocab, K teacher top-k.

Normalisation. Every loss is a token-level mean: the sum of the per-token loss over the masked
target positions of the whole batch, divided by the number of those positions (all rows together,
so a document weighs in proportion to its completion tokens, as in the R1-distill SFT recipe). A
batch with no masked position gives loss 0, not NaN.

Teacher signal. Per target position the traces store the teacher's K most likely next tokens
(`top_ids_btk`) and their log-probabilities (`top_logprobs_btk`): real, unnormalised
log-probabilities of the teacher's temperature-1 distribution over its whole vocabulary, whatever
temperature the traces were sampled at. The in-process engine records them from the raw logits,
before temperature and filters (`distill.inference.programs`; tests/test_loss_references.py). vLLM
V1 returns the same by default: its `logprobs_mode` defaults to "raw_logprobs", the log-softmax
of the model's logits before temperature, penalties and top-k/top-p (a teacher's server must not
be started with "processed_logprobs"; vLLM V0 returned processed ones), and its `prompt_logprobs`,
which teacher scoring reads, are the log-softmax of the model's logits with no sampling setting
applied (V1's model runner, `_get_prompt_logprobs_dict`). The teacher distribution is that top-k
renormalised: q = softmax_K(top_logprobs / tau), which re-tempers the stored log-probabilities
exactly (up to the mass outside the top-k, which is dropped) unless the tail bucket is on.
Entries whose log-probability is -inf are absent (zero weight); a position with no entry is left
out of the distillation mean.

Tail bucket (`Divergence.tail`, config `loss.tail_bucket`; TRL's `loss_add_tail`). The teacher's K
entries keep their stored probabilities q_k (no renormalisation) and the rest, 1 - sum_k q_k, is
one more class; the student's classes are its full-vocabulary probabilities p(k) at the same ids and
its mass outside them, 1 - sum_k p(k), computed in log space as the logsumexp of its logits outside
the ids (no cancellation). The teacher's tail is log(-expm1(logsumexp_k log q_k)), floored at
2**-23 (float32's resolution of that sum: stored probabilities that add up to 1 leave an unknown,
not an empty, rest). A position whose ids cover the whole vocabulary has no tail class on either
side, so with a full-vocabulary top-k each divergence is exactly the full-vocabulary one. The
tail is defined at temperature 1 only (the tempered mass of a bucket is not a function of its
mass) and for the divergences over one tokenizer (forward_kl, reverse_kl, jsd); the config and
the loss functions refuse other combinations with one line.

Divergences, with tau = temperature applied to the student's logits and the teacher's log-probs, all
multiplied by tau**2 so gradient sizes stay comparable across temperatures (Hinton et al. 2015):

- forward_kl: KL(q || p) = sum_k q_k (log q_k - log p(k)), p the student's softmax over the full
  vocabulary read at the K ids, so student mass outside the teacher's top-k is penalised (top-k KD).
- reverse_kl: KL(r || q), r the student's softmax restricted to the same K ids and renormalised
  (the teacher is unknown outside its top-k); with the tail bucket, r is the student's K + 1
  classes as they are (not renormalised).
- jsd: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) as TRL's
  `GKDTrainer.generalized_jsd_loss` computes it: M = beta q + (1 - beta) r,
  JSD = beta KL(q || M) + (1 - beta) KL(r || M); beta = 0 is forward_kl and beta = 1 is reverse_kl
  (TRL's special cases: the formula itself vanishes at both ends).

Across tokenizers (the teacher's vocabulary is not the student's), the data pipeline aligns the
teacher's tokens to the student's (`distill.data.align`) and gives each teacher entry the student
id whose bytes it spells, or an id outside [0, V) where no single student token does (unmatched);
a position carries entries only at the first token of an aligned span. forward_kl, reverse_kl and
jsd leave unmatched entries out; two divergences read them:

- gold (after TRL's GOLD hybrid): matched_weight * sum over matched entries of q_k (log q_k -
  log p(k)) * tau**2 (today's forward_kl restricted to the matched entries, q still normalised
  over the whole top-k, so with one tokenizer it is forward_kl) + unmatched_weight * ULD between
  the unmatched entries' q and the student's most likely tokens outside the matched ids.
- uld (Boizard et al. 2024): ULD between all of q and the student's most likely tokens, ids
  ignored. ULD = sum_i |sort(p)_i - sort(q)_i| over the n largest probabilities of each side, n
  the number of teacher entries compared (the L1 / Wasserstein-1 distance of sorted
  distributions; the teacher is unknown past its top-k, so both sides stop at n). With no
  unmatched entry gold's ULD term is 0, so gold with one tokenizer is forward_kl exactly.

`distill_loss` mixes (1 - alpha) * cross-entropy + alpha * divergence; `chunked_loss` computes the
same from hidden states over sequence chunks, so float32 [B, T, V] logits never exist at once.

On-policy batches (`policy=PolicyTerm(old_logprobs_bt, advantages_bt)`, the student's own samples):
the loss is the token-level mean over the mask of the divergence to the teacher (when `div` is
given) plus the importance-weighted policy-gradient term -(exp(log p(y_t) - old_t) * A_t), p the
student at temperature 1, old the sampler's log-probability of the token, A its advantage (which
already carries any teacher log-ratio or reward); neither old nor A gets a gradient, and there is
no cross-entropy term (alpha is ignored). Both terms are divided by the number of masked positions,
so each chunk's weight is known in the forward pass, as for the off-policy loss. Without `policy`
everything is the off-policy loss above, unchanged.

The divergences are a registry (`DIVERGENCES`, filled by `@register_divergence`): a divergence is
one function of the per-position views (`TokenView`) and its hyperparameters (`Divergence`), and
whether it reads unmatched entries is registered with it. `LossConfig.kind` offers exactly these
names (and "sft", cross-entropy alone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distill.errors import DistillError

_NEG = -1e30  # stands in for log(0): finite, so masked entries never turn gradients into NaN


class TeacherTopK(NamedTuple):
    """The teacher's stored top-k per target position (a pytree, so it passes through jit/scan)."""

    top_ids_btk: jax.Array  # int32 [B, T, K]; outside [0, V) where the entry is no student token
    top_logprobs_btk: jax.Array  # float32 [B, T, K]; -inf where absent


class Divergence(NamedTuple):
    """The teacher term's hyperparameters: a registered divergence name and Python floats, so it
    is hashable and static under jit. Bounds are checked where it is built from a config
    (`distill.train.config.LossConfig`, by pydantic); a new hyperparameter is a field here and
    one there."""

    kind: str = "forward_kl"  # a name in DIVERGENCES
    beta: float = 0.5  # jsd: M = beta q + (1 - beta) r
    temperature: float = 1.0
    matched_weight: float = 1.0  # gold only
    unmatched_weight: float = 1.0  # gold only
    tail: bool = False  # the mass outside the top-k as one more class (forward_kl/reverse_kl/jsd)


class PolicyTerm(NamedTuple):
    """An on-policy batch's policy-gradient inputs (a pytree; neither gets a gradient)."""

    old_logprobs_bt: jax.Array  # float32 [B, T]: the sampler's log-prob of each target token
    advantages_bt: jax.Array  # float32 [B, T]: per target token (already includes any reward)


class TokenView(NamedTuple):
    """What every divergence reads at each target position, at temperature tau (float32)."""

    z_btv: jax.Array  # the student's logits / tau [B, T, V]
    ids_btk: jax.Array  # the teacher's ids clipped into [0, V) [B, T, K]
    z_btk: jax.Array  # z_btv read at ids_btk
    valid_btk: jax.Array  # entries the divergence reads (matched only, unless it reads unmatched)
    matched_btk: jax.Array  # present entries that are student tokens
    log_q_btk: jax.Array  # the teacher's top-k renormalised over valid_btk, at tau
    log_p_btk: jax.Array  # the student's full-vocabulary log-softmax read at ids_btk
    # With the tail bucket valid_btk, log_q_btk and log_p_btk have K + 1 entries, the tail class
    # last, and log_q_btk keeps the stored probabilities (see the module docstring).


class DivergenceKind(NamedTuple):
    """A registered divergence: its per-token value [B, T] and whether it reads the teacher's
    unmatched entries (ids that are no student token: the cross-tokenizer divergences)."""

    per_token: Callable[[TokenView, Divergence], jax.Array]
    reads_unmatched: bool


DIVERGENCES: dict[str, DivergenceKind] = {}
"""The registry: divergence name -> implementation. `LossConfig.kind` accepts these and "sft"."""


def register_divergence(name: str, *, reads_unmatched: bool = False):
    """Decorator: register `fn(view: TokenView, div: Divergence) -> [B, T]` as divergence `name`
    (multiplied by tau**2 inside `fn`, as the module docstring's divergences are)."""
    def register(fn: Callable[[TokenView, Divergence], jax.Array]):
        DIVERGENCES[name] = DivergenceKind(fn, reads_unmatched)
        return fn
    return register


def divergence_kind(name: str) -> DivergenceKind:
    """The divergence registered as `name`; a DistillError naming the choices otherwise."""
    if name not in DIVERGENCES:
        raise DistillError(f"unknown distillation divergence {name!r}; choose one of "
                           f"{', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def tail_problem(kind: str, temperature: float) -> str | None:
    """Why the tail bucket cannot go with divergence `kind` at `temperature` (None: it can; a
    name that is no divergence, e.g. "sft", has nothing to add the tail to)."""
    if kind in DIVERGENCES and DIVERGENCES[kind].reads_unmatched:
        return (f"the tail bucket is for the divergences over one tokenizer "
                f"({', '.join(k for k, d in DIVERGENCES.items() if not d.reads_unmatched)}), "
                f"not {kind!r}")
    if kind in DIVERGENCES and temperature != 1.0:
        return (f"the tail bucket needs temperature 1, not {temperature}: the mass outside the "
                "top-k cannot be re-tempered as one class")
    return None


# ---------------------------------------------------------------------------------------------
# Per-token pieces


def _logsumexp_v(logits_btv: jax.Array) -> jax.Array:
    return jax.nn.logsumexp(logits_btv, axis=-1)  # [B, T]


def _token_ce(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Negative log-likelihood [B, T] of each target and whether the argmax hits it [B, T]."""
    target_logit = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    nll = _logsumexp_v(logits_btv) - target_logit
    correct = jnp.argmax(logits_btv, axis=-1) == targets_bt
    return nll, correct


def _log_normalise(x_btk: jax.Array, valid_btk: jax.Array) -> jax.Array:
    """log softmax over the valid entries of the last axis; _NEG elsewhere."""
    x = jnp.where(valid_btk, x_btk, _NEG)
    return jnp.where(valid_btk, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), _NEG)


def _kl(logp_btk: jax.Array, logq_btk: jax.Array, valid_btk: jax.Array) -> jax.Array:
    """KL(p || q) [B, T] over the valid entries, from log-probabilities."""
    terms = jnp.exp(logp_btk) * (logp_btk - logq_btk)
    return jnp.sum(jnp.where(valid_btk, terms, 0.0), axis=-1)


def _uld(p_btv: jax.Array, q_btk: jax.Array, exclude_btk: jax.Array | None) -> jax.Array:
    """sum_i |sort(p)_i - sort(q)_i| [B, T] over the n largest of each side, n the number of
    q's entries (its zeros are absent ones), p's ids in `exclude_btk` (-1: none) left out."""
    k = q_btk.shape[-1]
    q_sorted = -jnp.sort(-q_btk, axis=-1)
    n_bt = jnp.sum(q_btk > 0, axis=-1)
    if exclude_btk is None:
        p_sorted = jax.lax.top_k(p_btv, k)[0]
    else:  # the K largest outside at most K excluded ids are among the 2K largest
        p_top, p_ids = jax.lax.top_k(p_btv, min(2 * k, p_btv.shape[-1]))
        hit = jnp.any(p_ids[..., :, None] == exclude_btk[..., None, :], axis=-1)
        p_sorted = jax.lax.top_k(jnp.where(hit, 0.0, p_top), k)[0]
    return jnp.sum(jnp.where(jnp.arange(k) < n_bt[..., None], jnp.abs(p_sorted - q_sorted), 0.0),
                   axis=-1)


# the least probability a teacher is taken to give (its tail class; a token it cannot produce, on
# the student's own samples): float32's resolution of a sum near 1
TEACHER_FLOOR = 2.0**-23


def _with_tail(view: TokenView, teacher_lp_btk: jax.Array, lse_bt: jax.Array) -> TokenView:
    """`view` (at temperature 1) with the tail class appended on both sides: the teacher's
    stored probabilities kept as they are and the mass outside the ids one more class."""
    z_btv, valid = view.z_btv, view.valid_btk
    lse_q = jax.nn.logsumexp(jnp.where(valid, teacher_lp_btk, _NEG), axis=-1)
    log_q_tail = jnp.log(-jnp.expm1(jnp.minimum(lse_q, jnp.log1p(-TEACHER_FLOOR))))
    b, t, _ = view.ids_btk.shape
    hit_btv = jnp.zeros(z_btv.shape, jnp.float32).at[
        jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], view.ids_btk].add(
        valid.astype(jnp.float32)) > 0
    has_tail = ~jnp.all(hit_btv, axis=-1)  # some vocabulary outside the ids
    log_p_tail = jax.nn.logsumexp(jnp.where(hit_btv, _NEG, z_btv), axis=-1) - lse_bt
    log_q = jnp.where(valid, teacher_lp_btk, _NEG)
    return view._replace(
        valid_btk=jnp.concatenate([valid, has_tail[..., None]], axis=-1),
        log_q_btk=jnp.concatenate([log_q, jnp.where(has_tail, log_q_tail, _NEG)[..., None]], -1),
        log_p_btk=jnp.concatenate(
            [view.log_p_btk, jnp.where(has_tail, log_p_tail, _NEG)[..., None]], axis=-1))


def _token_view(logits_btv: jax.Array, teacher: TeacherTopK, tau: float,
                reads_unmatched: bool, tail: bool = False) -> TokenView:
    """The student and teacher distributions at each position, as every divergence reads them."""
    z_btv = logits_btv / tau
    ids = jnp.clip(teacher.top_ids_btk, 0, logits_btv.shape[-1] - 1)
    z_btk = jnp.take_along_axis(z_btv, ids, axis=-1)
    teacher_lp = jax.lax.stop_gradient(teacher.top_logprobs_btk.astype(jnp.float32))
    valid = jnp.isfinite(teacher_lp)
    matched = valid & (teacher.top_ids_btk >= 0) & (teacher.top_ids_btk < logits_btv.shape[-1])
    if not reads_unmatched:
        valid = matched  # an entry that is no student token means nothing to these divergences
    log_q = _log_normalise(jnp.where(valid, teacher_lp, 0.0) / tau, valid)
    lse = _logsumexp_v(z_btv)
    log_p = jnp.where(valid, z_btk - lse[..., None], _NEG)
    view = TokenView(z_btv, ids, z_btk, valid, matched, log_q, log_p)
    return _with_tail(view, teacher_lp, lse) if tail else view


def _token_kd(logits_btv: jax.Array, teacher: TeacherTopK, div: Divergence
              ) -> tuple[jax.Array, jax.Array]:
    """Divergence [B, T] and whether the position has any teacher entry."""
    kind = divergence_kind(div.kind)
    view = _token_view(logits_btv, teacher, float(div.temperature), kind.reads_unmatched,
                       div.tail)
    return kind.per_token(view, div), jnp.any(view.valid_btk, axis=-1)


# ---------------------------------------------------------------------------------------------
# The divergences (the registry, in the order configs and errors list them)


def _tau2(div: Divergence) -> float:
    """tau**2: keeps gradient sizes comparable across temperatures (Hinton et al. 2015)."""
    return float(div.temperature)**2


@register_divergence("forward_kl")
def _forward_kl(v: TokenView, div: Divergence) -> jax.Array:
    return _kl(v.log_q_btk, v.log_p_btk, v.valid_btk) * _tau2(div)


def _student_r(v: TokenView, div: Divergence) -> jax.Array:
    """The student as reverse_kl and jsd compare it: restricted to the teacher's K ids and
    renormalised, or with the tail bucket its K + 1 classes as they are."""
    return v.log_p_btk if div.tail else _log_normalise(v.z_btk, v.valid_btk)


@register_divergence("reverse_kl")
def _reverse_kl(v: TokenView, div: Divergence) -> jax.Array:
    return _kl(_student_r(v, div), v.log_q_btk, v.valid_btk) * _tau2(div)


@register_divergence("jsd")
def _jsd(v: TokenView, div: Divergence) -> jax.Array:
    beta = div.beta
    if beta == 0.0:  # TRL's special cases: the formula itself vanishes at both ends
        return _forward_kl(v, div)
    if beta == 1.0:
        return _reverse_kl(v, div)
    log_r = _student_r(v, div)
    log_m = jnp.logaddexp(v.log_q_btk + jnp.log(beta), log_r + jnp.log1p(-beta))
    out = (beta * _kl(v.log_q_btk, log_m, v.valid_btk)
           + (1.0 - beta) * _kl(log_r, log_m, v.valid_btk))
    return out * _tau2(div)


@register_divergence("gold", reads_unmatched=True)
def _gold(v: TokenView, div: Divergence) -> jax.Array:
    kl = _kl(v.log_q_btk, v.log_p_btk, v.matched_btk) * _tau2(div)
    unmatched_q = jnp.where(v.valid_btk & ~v.matched_btk, jnp.exp(v.log_q_btk), 0.0)
    uld = _uld(jax.nn.softmax(v.z_btv, axis=-1), unmatched_q,
               jnp.where(v.matched_btk, v.ids_btk, -1))
    return div.matched_weight * kl + div.unmatched_weight * uld


@register_divergence("uld", reads_unmatched=True)
def _uld_divergence(v: TokenView, div: Divergence) -> jax.Array:
    return _uld(jax.nn.softmax(v.z_btv, axis=-1),
                jnp.where(v.valid_btk, jnp.exp(v.log_q_btk), 0.0), None)


# ---------------------------------------------------------------------------------------------
# Sums (what chunks add up) and the final mean


def _sums(logits_btv, targets_bt, mask_bt, teacher, alpha, div: Divergence | None,
          policy: PolicyTerm | None = None) -> dict:
    """Masked sums of one batch (or chunk): cross-entropy, hits, tokens and, with KD, divergence;
    with `policy`, the policy-gradient term, importance ratio and entropy too."""
    logits_btv = logits_btv.astype(jnp.float32)
    mask = mask_bt.astype(jnp.float32)
    nll, correct = _token_ce(logits_btv, targets_bt)
    out = {"ce_sum": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask),
           "tokens": jnp.sum(mask)}
    if _uses_teacher(div, alpha, policy):
        per_token, has_teacher = _token_kd(logits_btv, teacher, div)
        kd_mask = mask * has_teacher
        out["kd_sum"] = jnp.sum(per_token * kd_mask)
        out["kd_tokens"] = jnp.sum(kd_mask)
    if policy is not None:
        out |= _policy_sums(logits_btv, -nll, mask, policy)
    return out


def _policy_sums(logits_btv, logp_bt, mask, policy: PolicyTerm) -> dict:
    """Masked sums of -(ratio * A) (the gradient flows through log p only), of the ratio, and of
    the student's entropy at temperature 1 (a metric)."""
    old = jax.lax.stop_gradient(policy.old_logprobs_bt.astype(jnp.float32))
    adv = jax.lax.stop_gradient(policy.advantages_bt.astype(jnp.float32))
    ratio = jnp.exp(logp_bt - old)
    probs = jax.nn.softmax(logits_btv, axis=-1)
    entropy = _logsumexp_v(logits_btv) - jnp.sum(probs * logits_btv, axis=-1)
    return {"pg_sum": jnp.sum(-ratio * adv * mask), "ratio_sum": jnp.sum(ratio * mask),
            "entropy_sum": jnp.sum(jax.lax.stop_gradient(entropy) * mask)}


def _finish_policy(sums: dict, metrics: dict) -> tuple[jax.Array, dict]:
    """The on-policy loss from the sums: (KD + policy gradient) / masked positions."""
    n = jnp.maximum(sums["tokens"], 1.0)
    pg = sums["pg_sum"] / n
    metrics |= {"pg": pg, "ratio": sums["ratio_sum"] / n, "entropy": sums["entropy_sum"] / n}
    loss = pg
    if "kd_sum" in sums:
        kd = sums["kd_sum"] / n
        loss = kd + pg
        metrics |= {"kd": kd, "kd_tokens": sums["kd_tokens"]}
    metrics["loss"] = loss
    return loss, metrics


def _finish(sums: dict, alpha: float) -> tuple[jax.Array, dict]:
    """Token-level means from the sums; (1 - alpha) * CE + alpha * KD when there is a teacher
    (the on-policy objective when the sums carry a policy term)."""
    tokens = sums["tokens"]
    ce = sums["ce_sum"] / jnp.maximum(tokens, 1.0)
    metrics = {"ce": ce, "tokens": tokens, "accuracy": sums["correct"] / jnp.maximum(tokens, 1.0)}
    if "pg_sum" in sums:
        return _finish_policy(sums, metrics)
    loss = ce
    if "kd_sum" in sums:
        kd = sums["kd_sum"] / jnp.maximum(sums["kd_tokens"], 1.0)
        loss = (1.0 - alpha) * ce + alpha * kd
        metrics |= {"kd": kd, "kd_tokens": sums["kd_tokens"]}
    metrics["loss"] = loss
    return loss, metrics


def _uses_teacher(div: Divergence | None, alpha: float, policy: PolicyTerm | None = None) -> bool:
    """Whether the teacher term is computed: a divergence with alpha != 0 or on a policy batch."""
    return div is not None and (alpha != 0.0 or policy is not None)


def _check(div: Divergence | None, alpha: float, teacher, policy: PolicyTerm | None = None) -> None:
    """One-line errors for a combination that cannot work (bounds are the config's: LossConfig)."""
    if div is None and alpha != 0.0 and policy is None:
        raise DistillError(f"loss 'sft' has no teacher term: alpha must be 0 (got {alpha}); "
                           f"choose one of {', '.join(DIVERGENCES)} to distil")
    if div is not None:
        divergence_kind(div.kind)
        if div.tail and (problem := tail_problem(div.kind, float(div.temperature))):
            raise DistillError(problem)
    if _uses_teacher(div, alpha, policy) and teacher is None:
        if policy is not None:
            raise DistillError(f"the on-policy loss with divergence {div.kind!r} needs the "
                               "teacher's top-k log-probabilities, and the batch carries none")
        raise DistillError(f"loss {div.kind!r} with alpha {alpha} needs the teacher's top-k "
                           "log-probabilities, and the batch carries none (set alpha to 0, or "
                           "generate traces with top-k log-probabilities)")


# ---------------------------------------------------------------------------------------------
# Public losses


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array):
    """SFT next-token cross-entropy, the token-level mean over `mask_bt` (the R1-distill recipe).

    logits_btv: [B, T, V] (cast to float32); targets_bt: int [B, T]; mask_bt: [B, T] (1 = train).
    Metrics: loss, ce (the same), tokens (masked positions), accuracy (argmax hits the target).
    """
    return _finish(_sums(logits_btv, targets_bt, mask_bt, None, 0.0, None), 0.0)


def kd_loss(student_logits_btv: jax.Array, top_ids_btk: jax.Array, top_logprobs_btk: jax.Array,
            mask_bt: jax.Array, div: Divergence):
    """Distillation from stored teacher top-k: the token-level mean of the divergence `div`
    over the masked positions that carry a teacher entry (see the module docstring and
    DIVERGENCES). Metrics: loss, kd_tokens."""
    teacher = TeacherTopK(top_ids_btk, top_logprobs_btk)
    _check(div, 1.0, teacher)
    per_token, has_teacher = _token_kd(student_logits_btv.astype(jnp.float32), teacher, div)
    kd_mask = mask_bt.astype(jnp.float32) * has_teacher
    kd_tokens = jnp.sum(kd_mask)
    loss = jnp.sum(per_token * kd_mask) / jnp.maximum(kd_tokens, 1.0)
    return loss, {"loss": loss, "kd_tokens": kd_tokens}


def distill_loss(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
                 teacher: TeacherTopK | None = None, *, div: Divergence | None = None,
                 alpha: float = 0.0, policy: PolicyTerm | None = None):
    """(1 - alpha) * cross_entropy + alpha * the divergence `div` to the teacher's top-k.

    `div` None (SFT) or alpha 0 is exactly `cross_entropy`: the teacher is not read. alpha is a
    Python float (static under jit), as `div`'s fields are. Metrics: loss, ce, tokens,
    accuracy, and with a teacher term kd and kd_tokens.

    With `policy` (an on-policy batch) the loss is the on-policy objective of the module
    docstring instead: the mean over the mask of the divergence (when `div` is given; the
    teacher is then required) plus -(ratio * A); alpha is ignored. Metrics also: pg, ratio and
    entropy (means over the mask; kd is then divided by the masked positions too).
    """
    _check(div, alpha, teacher, policy)
    return _finish(_sums(logits_btv, targets_bt, mask_bt, teacher, alpha, div, policy), alpha)


def chunked_loss(hidden_btd: jax.Array, head_fn: Callable[[jax.Array], jax.Array],
                 targets_bt: jax.Array, mask_bt: jax.Array, teacher: TeacherTopK | None = None, *,
                 div: Divergence | None = None, alpha: float = 0.0, chunk: int = 512,
                 policy: PolicyTerm | None = None):
    """`distill_loss(head_fn(hidden_btd), ...)` computed over sequence chunks of `chunk` positions.

    head_fn maps hidden [B, c, D] to logits [B, c, V] (e.g. `model.logits`); the arrays it closes
    over (the output head's weights) get their gradients. The chunks run under `lax.scan`, so at
    most [B, chunk, V] float32 logits exist at once. The gradient is computed in the same pass as
    the loss (a custom VJP): the weights of the cross-entropy and divergence sums in the final
    mean depend only on the mask and the teacher's entries, so each chunk's contribution to the
    loss is known in the forward pass, and its gradients with respect to the hidden states and
    the head are taken there and scaled by the incoming cotangent in the backward pass. The head
    then runs three matmuls a chunk (logits, dHidden, dHead) instead of four (the backward pass
    recomputing the logits), and no [B, chunk, V] tensor is kept or rebuilt for the backward
    pass. The returned metrics carry no gradient (only the loss does). T need not divide by
    `chunk`: the tail is padded with masked positions. With `policy`, the on-policy objective
    of `distill_loss` (its weights are 1 / masked positions, known in the forward pass too).
    """
    _check(div, alpha, teacher, policy)
    t = hidden_btd.shape[1]
    chunk = max(1, min(int(chunk), t))
    n = -(-t // chunk)
    teacher = teacher if _uses_teacher(div, alpha, policy) else None
    rest = (_chunks(targets_bt, n, chunk, 0), _chunks(mask_bt, n, chunk, 0),
            None if teacher is None else TeacherTopK(
                _chunks(teacher.top_ids_btk, n, chunk, 0),
                _chunks(teacher.top_logprobs_btk, n, chunk, -jnp.inf)),
            None if policy is None else PolicyTerm(*(_chunks(x, n, chunk, 0.0) for x in policy)))
    h_chunks = _chunks(hidden_btd, n, chunk, 0.0)
    head, consts = jax.closure_convert(head_fn, h_chunks[0])
    weights = _sum_weights(mask_bt, teacher, alpha, policy is not None)
    static = (head, alpha, div)
    loss, sums = _head_loss(static, jax.lax.stop_gradient(weights), h_chunks, consts, rest)
    _, metrics = _finish(jax.lax.stop_gradient(sums), alpha)
    metrics["loss"] = loss
    return loss, metrics


def _sum_weights(mask_bt, teacher: TeacherTopK | None, alpha: float, policy: bool) -> dict:
    """d loss / d (each chunk's sums): what `_finish` divides them by."""
    mask = mask_bt.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    if policy:
        return {"pg_sum": 1.0 / tokens} | ({} if teacher is None else {"kd_sum": 1.0 / tokens})
    weights = {"ce_sum": (1.0 - alpha if teacher is not None else 1.0) / tokens}
    if teacher is not None:
        has_teacher = jnp.any(jnp.isfinite(teacher.top_logprobs_btk), axis=-1)
        weights["kd_sum"] = alpha / jnp.maximum(jnp.sum(mask * has_teacher), 1.0)
    return weights


def _head_loss_forward(static, weights, h_chunks, consts, rest):
    """(loss, sums, dLoss/dHidden chunks, dLoss/dHead) over the chunks, one scan."""
    head, alpha, div = static

    def chunk_objective(h_bcd, consts, tgt_bc, m_bc, teach, pol):
        sums = _sums(head(h_bcd, *consts), tgt_bc, m_bc, teach, alpha, div, pol)
        return sum(w * sums[k] for k, w in weights.items()), sums

    def body(acc, x):
        h_bcd, (tgt_bc, m_bc, teach, pol) = x
        loss, vjp, sums = jax.vjp(lambda h, c: chunk_objective(h, c, tgt_bc, m_bc, teach, pol),
                                  h_bcd, consts, has_aux=True)
        d_h, d_consts = vjp(jnp.ones((), loss.dtype))
        loss_acc, sums_acc, d_acc = acc
        d_acc = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), d_acc, d_consts)
        return (loss_acc + loss, jax.tree.map(jnp.add, sums_acc, sums), d_acc), d_h

    keys = (("ce_sum", "correct", "tokens") + (() if rest[2] is None else ("kd_sum", "kd_tokens"))
            + (() if rest[3] is None else ("pg_sum", "ratio_sum", "entropy_sum")))
    zeros = {k: jnp.zeros((), jnp.float32) for k in keys}
    d_zeros = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), consts)
    (loss, sums, d_consts), d_h = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros, d_zeros), (h_chunks, rest))
    return loss, sums, d_h, d_consts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_loss(static, weights, h_chunks, consts, rest):
    return _head_loss_forward(static, weights, h_chunks, consts, rest)[:2]


def _head_loss_fwd(static, weights, h_chunks, consts, rest):
    loss, sums, d_h, d_consts = _head_loss_forward(static, weights, h_chunks, consts, rest)
    return (loss, sums), (d_h, d_consts, consts)


def _head_loss_bwd(static, residuals, cotangents):
    d_h, d_consts, consts = residuals
    g = cotangents[0]  # the sums are metrics: their cotangents are dropped (see chunked_loss)
    return (None, (g * d_h).astype(d_h.dtype),
            jax.tree.map(lambda d, c: (g * d).astype(c.dtype), d_consts, consts), None)


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def _chunks(x_bt: jax.Array, n: int, chunk: int, fill) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], padding T up to n * chunk with `fill`."""
    pad = n * chunk - x_bt.shape[1]
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_bt.ndim - 2)
        x_bt = jnp.pad(x_bt, widths, constant_values=fill)
    x = x_bt.reshape(x_bt.shape[0], n, chunk, *x_bt.shape[2:])
    return jnp.moveaxis(x, 1, 0)
