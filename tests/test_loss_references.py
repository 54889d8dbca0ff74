"""Issue 29's loss acceptance: values and gradients of forward_kl, reverse_kl and jsd (with and
without the tail bucket) and of the on-policy policy-gradient term against float64 NumPy
references (gradients by central finite differences, no autodiff) on a vocabulary of 11; the tail
bucket over a full-vocabulary top-k is exactly the full-vocabulary divergence; the off-policy loss
(lambda = 0) is bit for bit the formula before the on-policy term; the on-policy loss chunked
equals unchunked; and the engine records the teacher's temperature-1 log-probabilities whatever
temperature it samples at."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.config import validate
from distill.errors import DistillError
from distill.losses import Divergence, PolicyTerm, TeacherTopK, chunked_loss, distill_loss, kd_loss
from distill.train.config import LossConfig

ROOT = Path(__file__).resolve().parents[1]
B, T, V = 2, 3, 11
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
         ("jsd", 0.0), ("jsd", 1.0)]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _problem(k: int, seed: int = 0):
    """Student logits [B, T, V], teacher ids [B, T, k] (distinct) and their stored log-probs:
    the log-softmax of a teacher's logits over all V, read at its k largest (float32, as stored).
    Position (1, 2) has one absent entry when k < V."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * 1.5).astype(np.float32)
    teacher = rng.normal(size=(B, T, V)) * 2.0
    lp_full = _log_softmax(teacher)
    ids = np.argsort(-lp_full, axis=-1)[..., :k]
    ids = rng.permuted(ids, axis=-1).astype(np.int32)  # stored order does not matter
    lps = np.take_along_axis(lp_full, ids, -1).astype(np.float32)
    if k < V:
        lps[1, 2, -1] = -np.inf
    return logits, ids, lps, lp_full


# --------------------------------------------------------------------------- NumPy reference


def _kl(a, b):
    """KL(a || b) over the entries where a > 0, in float64."""
    keep = a > 0
    return float(np.sum(a[keep] * (np.log(a[keep]) - np.log(b[keep]))))


def _classes(z, ids, lp, tail):
    """(teacher q, student p at the ids (full vocabulary), student r as reverse_kl/jsd read it)
    at one position, the module docstring's definitions at temperature 1."""
    valid = np.isfinite(lp)
    ids, lp = ids[valid], lp[valid].astype(np.float64)
    p_full = np.exp(_log_softmax(z))
    p = p_full[ids]
    if not tail:
        q = np.exp(_log_softmax(lp))
        return q, p, np.exp(_log_softmax(z[ids].astype(np.float64)))
    q = np.exp(lp)
    if len(set(ids.tolist())) < len(z):  # some vocabulary outside the ids: the tail class
        q = np.append(q, 1.0 - q.sum())
        p = np.append(p, np.delete(p_full, ids).sum())
    return q, p, p


def ref_divergence(z, ids, lp, kind, beta, tail):
    q, p, r = _classes(z, ids, lp, tail)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(q, p)
    if kind == "reverse_kl" or beta == 1.0:
        return _kl(r, q)
    m = beta * q + (1 - beta) * r
    return beta * _kl(q, m) + (1 - beta) * _kl(r, m)


def ref_loss(logits, ids, lps, mask, kind, beta, tail):
    """The kd_loss mean over masked positions with a teacher entry."""
    total = count = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t] and np.isfinite(lps[b, t]).any():
                total += ref_divergence(logits[b, t], ids[b, t], lps[b, t], kind, beta, tail)
                count += 1
    return total / count


def ref_onpolicy(logits, targets, mask, old, adv, teacher=None):
    """(loss, entropy, ratio) of the on-policy objective: mean over the mask of
    [forward_kl to the teacher's top-k, when given] - exp(log p(y) - old) * A."""
    logp = _log_softmax(logits)
    lp_y = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ratio = np.exp(lp_y - old)
    per = -ratio * adv
    if teacher is not None:
        ids, lps, kind, beta, tail = teacher
        per = per + np.array([[ref_divergence(logits[b, t], ids[b, t], lps[b, t], kind, beta,
                                              tail) for t in range(T)] for b in range(B)])
    entropy = -(np.exp(logp) * logp).sum(-1)
    n = mask.sum()
    return (per * mask).sum() / n, (entropy * mask).sum() / n, (ratio * mask).sum() / n


def finite_difference(fn, x, h=1e-5, picks=24):
    """d fn / d x by central differences at `picks` coordinates of x drawn at random (a fixed
    draw; every coordinate when x has no more), fn a float64 function of a float64 array.
    Returns (flat indices, the derivatives there)."""
    x = np.asarray(x, np.float64)
    n = x.size
    where = np.arange(n) if n <= picks else np.sort(
        np.random.default_rng(0).choice(n, picks, replace=False))
    grad = np.zeros(len(where))
    for j, i in enumerate(where):
        e = np.zeros(n)
        e[i] = h
        e = e.reshape(x.shape)
        grad[j] = (fn(x + e) - fn(x - e)) / (2 * h)
    return where, grad


# --------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [4, V])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_values_and_gradients_match_numpy(kind, beta, k, tail):
    logits, ids, lps, _ = _problem(k)
    mask = np.ones((B, T), np.float32)
    mask[0, 1] = 0.0
    div = Divergence(kind, beta, tail=tail)
    got, grad = jax.value_and_grad(lambda z: kd_loss(z, ids, lps, mask, div)[0])(
        jnp.asarray(logits))
    want = ref_loss(logits, ids, lps, mask, kind, beta, tail)
    assert want > 1e-3
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    at, want_grad = finite_difference(lambda z: ref_loss(z, ids, lps, mask, kind, beta, tail),
                                      logits)
    np.testing.assert_allclose(np.ravel(grad)[at], want_grad, atol=2e-6)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_tail_over_the_full_vocabulary_is_the_full_divergence(kind, beta):
    """K = V: every id stored, so there is no tail class; each divergence is the exact one over
    the teacher's whole distribution (float64 from the teacher's logits) within 1e-6."""
    logits, ids, lps, lp_full = _problem(V, seed=3)
    mask = np.ones((B, T), np.float32)
    got = kd_loss(logits, ids, lps, mask, Divergence(kind, beta, tail=True))[0]
    p, q = np.exp(_log_softmax(logits)), np.exp(lp_full)
    want = []
    for b in range(B):
        for t in range(T):
            if kind == "forward_kl" or beta == 0.0:
                want.append(_kl(q[b, t], p[b, t]))
            elif kind == "reverse_kl" or beta == 1.0:
                want.append(_kl(p[b, t], q[b, t]))
            else:
                m = beta * q[b, t] + (1 - beta) * p[b, t]
                want.append(beta * _kl(q[b, t], m) + (1 - beta) * _kl(p[b, t], m))
    np.testing.assert_allclose(got, np.mean(want), rtol=0, atol=1e-6)


def test_tail_is_stable_where_the_top_k_holds_almost_all_mass():
    """A student and teacher with 1e-12 of mass outside the top-2: finite values and gradients,
    and the stored probabilities' sum at 1 floors the teacher's tail instead of taking log 0."""
    logits = np.full((1, 1, V), -40.0, np.float32)
    logits[0, 0, :2] = [3.0, 2.0]
    ids = np.array([[[0, 1]]], np.int32)
    lps = _log_softmax(np.array([3.0, 2.0]))[None, None].astype(np.float32)  # sums to 1
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        val, grad = jax.jit(jax.value_and_grad(lambda z, kind=kind: kd_loss(
            z, ids, lps, np.ones((1, 1)), Divergence(kind, tail=True))[0]))(jnp.asarray(logits))
        assert np.isfinite(val) and abs(float(val)) < 1e-5
        assert np.all(np.isfinite(grad))


def test_tail_settings_that_cannot_work_are_one_line():
    for data, message in [({"kind": "gold"}, "for the divergences over one tokenizer"),
                          ({"kind": "uld"}, "not 'uld'"),
                          ({"kind": "jsd", "temperature": 2.0}, "needs temperature 1, not 2.0")]:
        with pytest.raises(DistillError, match=rf"^run.yaml: tail_bucket: .*{message}"):
            validate(LossConfig, {**data, "tail_bucket": True}, "run.yaml")
        with pytest.raises(DistillError, match=message):
            div = Divergence(data["kind"], temperature=data.get("temperature", 1.0), tail=True)
            kd_loss(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1, 2), jnp.int32),
                    jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), div)
    cfg = validate(LossConfig, {"kind": "reverse_kl", "tail_bucket": True}, "run.yaml")
    assert cfg.divergence() == Divergence("reverse_kl", tail=True)
    assert LossConfig(kind="jsd").divergence().tail is False


# --------------------------------------------------------------------------- lambda = 0


def _old_offpolicy(logits, targets, mask, ids, lps, kind, beta, tau, alpha):
    """distill_loss as it was before the tail bucket and the policy term (same-tokenizer
    divergences), op for op."""
    neg = -1e30
    z = jnp.asarray(logits, jnp.float32)
    lse_z = jax.nn.logsumexp(z, axis=-1)
    nll = lse_z - jnp.take_along_axis(z, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    m = jnp.asarray(mask).astype(jnp.float32)
    ce = jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

    def norm(x, valid):
        x = jnp.where(valid, x, neg)
        return jnp.where(valid, x - jax.nn.logsumexp(x, axis=-1, keepdims=True), neg)

    def kl(a, b, valid):
        return jnp.sum(jnp.where(valid, jnp.exp(a) * (a - b), 0.0), axis=-1)

    zt = z / tau
    ids_c = jnp.clip(jnp.asarray(ids), 0, V - 1)
    z_k = jnp.take_along_axis(zt, ids_c, axis=-1)
    lp = jax.lax.stop_gradient(jnp.asarray(lps).astype(jnp.float32))
    valid = jnp.isfinite(lp) & (jnp.asarray(ids) >= 0) & (jnp.asarray(ids) < V)
    log_q = norm(jnp.where(valid, lp, 0.0) / tau, valid)
    log_p = jnp.where(valid, z_k - jax.nn.logsumexp(zt, axis=-1)[..., None], neg)
    if kind == "forward_kl":
        per = kl(log_q, log_p, valid) * tau**2
    elif kind == "reverse_kl":
        per = kl(norm(z_k, valid), log_q, valid) * tau**2
    else:
        log_r = norm(z_k, valid)
        log_mix = jnp.logaddexp(log_q + jnp.log(beta), log_r + jnp.log1p(-beta))
        per = (beta * kl(log_q, log_mix, valid) + (1.0 - beta) * kl(log_r, log_mix, valid)) * tau**2
    kd_mask = m * jnp.any(valid, axis=-1)
    kd = jnp.sum(per * kd_mask) / jnp.maximum(jnp.sum(kd_mask), 1.0)
    return (1.0 - alpha) * ce + alpha * kd


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("tau,alpha", [(1.0, 0.5), (2.0, 1.0)])
def test_off_policy_loss_is_bit_for_bit_the_old_formula(kind, beta, tau, alpha):
    """lambda = 0 (no on-policy batch, tail off) is today's off-policy loss exactly."""
    logits, ids, lps, _ = _problem(4, seed=5)
    rng = np.random.default_rng(6)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))
    got = distill_loss(logits, targets, mask, teacher, div=Divergence(kind, beta, tau),
                       alpha=alpha)[0]
    want = _old_offpolicy(logits, targets, mask, ids, lps, kind, beta, tau, alpha)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), (float(got), float(want))


# --------------------------------------------------------------------------- the policy term


def _policy_problem(seed=7):
    rng = np.random.default_rng(seed)
    logits, ids, lps, _ = _problem(4, seed)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    old = (_log_softmax(logits)[np.arange(B)[:, None], np.arange(T), targets]
           + rng.normal(size=(B, T)) * 0.2).astype(np.float32)  # a slightly stale sampler
    adv = rng.normal(size=(B, T)).astype(np.float32)
    return logits, targets, mask, ids, lps, old, adv


@pytest.mark.parametrize("teacher_kind", [None, ("forward_kl", 0.5, False),
                                          ("reverse_kl", 0.5, True), ("jsd", 0.5, True)])
def test_policy_term_values_and_gradients_match_numpy(teacher_kind):
    logits, targets, mask, ids, lps, old, adv = _policy_problem()
    policy = PolicyTerm(jnp.asarray(old), jnp.asarray(adv))
    div = teacher = ref_teacher = None
    if teacher_kind is not None:
        kind, beta, tail = teacher_kind
        div, teacher = Divergence(kind, beta, tail=tail), TeacherTopK(ids, lps)
        ref_teacher = (ids, lps, kind, beta, tail)

    def loss(z):
        return distill_loss(z, targets, mask, teacher, div=div, alpha=0.7, policy=policy)

    (got, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits))
    want, entropy, ratio = ref_onpolicy(logits, targets, mask, old, adv, ref_teacher)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], entropy, rtol=2e-6)
    np.testing.assert_allclose(metrics["ratio"], ratio, rtol=2e-6)
    np.testing.assert_allclose(metrics["pg"] + metrics.get("kd", 0.0), want, rtol=2e-6, atol=1e-6)
    assert ("kd" in metrics) == (teacher_kind is not None)
    at, want_grad = finite_difference(
        lambda z: ref_onpolicy(z, targets, mask, old, adv, ref_teacher)[0], logits)
    np.testing.assert_allclose(np.ravel(grad)[at], want_grad, atol=2e-6)


def test_policy_gradient_does_not_flow_into_old_logprobs_or_advantages():
    logits, targets, mask, _, _, old, adv = _policy_problem()

    def loss(o, a):
        return distill_loss(logits, targets, mask, policy=PolicyTerm(o, a))[0]

    g_old, g_adv = jax.grad(loss, argnums=(0, 1))(jnp.asarray(old), jnp.asarray(adv))
    assert not np.any(g_old) and not np.any(g_adv)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_chunked_policy_loss_equals_unchunked(with_teacher):
    logits, targets, mask, ids, lps, old, adv = _policy_problem(seed=8)
    rng = np.random.default_rng(9)
    hidden = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, V)), jnp.float32)
    policy = PolicyTerm(jnp.asarray(old), jnp.asarray(adv))
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps)) if with_teacher else None
    div = Divergence("jsd", 0.5, tail=True) if with_teacher else None

    def full(h, w):
        return distill_loss(h @ w, targets, mask, teacher, div=div, policy=policy)

    def chunked(h, w):  # T = 3 with chunk 2: the last chunk is padded
        return chunked_loss(h, lambda x: x @ w, targets, mask, teacher, div=div, chunk=2,
                            policy=policy)

    (want, want_m), want_g = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, w)
    (got, got_m), got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
        hidden, w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for key in want_m:
        np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for g, wg in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-6)


def test_onpolicy_loss_needs_the_teacher_it_names():
    logits, targets, mask, _, _, old, adv = _policy_problem()
    with pytest.raises(DistillError, match="^the on-policy loss with divergence 'reverse_kl' "
                                           "needs the teacher's top-k"):
        distill_loss(logits, targets, mask, None, div=Divergence("reverse_kl"),
                     policy=PolicyTerm(old, adv))


def test_make_onpolicy_loss_fn_on_the_tiny_student():
    """The trainer's on-policy loss: sums are means times tokens; gradients reach the model."""
    from flax import nnx

    from distill.models.families import load_model_config
    from distill.pretrained import init_model
    from distill.train.losses import make_onpolicy_loss_fn

    cfg = load_model_config(ROOT / "configs/students/tiny-qwen2.yaml")
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(10)
    b, t, k = 2, 12, 4
    tokens = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    batch = {"tokens_bt": tokens, "positions_bt": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "segment_ids_bt": np.ones((b, t), np.int32),
             "targets_bt": np.roll(tokens, -1, 1), "loss_mask_bt": np.ones((b, t), np.float32),
             "old_logprobs_bt": np.full((b, t), -6.0, np.float32),
             "advantages_bt": rng.normal(size=(b, t)).astype(np.float32),
             "top_ids_btk": rng.integers(0, cfg.vocab_size, (b, t, k)).astype(np.int32),
             "top_logprobs_btk": np.log(rng.dirichlet(np.ones(k + 1), (b, t))[..., :k]
                                        ).astype(np.float32)}
    batch["loss_mask_bt"][:, :3] = 0.0
    for div in (None, Divergence("reverse_kl", tail=True)):
        fn = make_onpolicy_loss_fn(div, chunk=5)
        (loss_sum, sums), grads = nnx.jit(nnx.value_and_grad(fn, has_aux=True))(model, batch)
        assert float(sums["tokens"]) == 18.0
        assert set(sums) == {"tokens", "pg", "entropy", "ratio"} | ({"kd"} if div else set())
        np.testing.assert_allclose(loss_sum, sums["pg"] + sums.get("kd", 0.0), rtol=1e-5)
        assert float(sums["entropy"]) / 18 > 1.0
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
        assert any(np.any(g) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- stored log-probs


def test_engine_records_temperature_one_logprobs_whatever_it_samples_at():
    """Sampling at temperature 0.7 with top-p, the recorded log-probabilities (sampled token and
    top-k) are log_softmax of the model's logits at temperature 1, before any filter."""
    from distill.inference import Engine, EngineConfig
    from distill.models.families import load_model_config
    from distill.pretrained import init_model
    from distill.sampling import SamplingParams

    cfg = load_model_config(ROOT / "configs/students/tiny-qwen2.yaml")
    model = init_model(cfg, seed=1)
    prompt = [5, 17, 300, 42, 9]
    engine = Engine(model, None, EngineConfig(slots=1, max_len=64, prefill_chunk=16,
                                              decode_steps=4, min_window=32), eos_ids=[])
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, logprobs=5, seed=3)
    [c] = engine.generate([prompt], params)
    seq = jnp.asarray([prompt + c.token_ids], jnp.int32)
    logits = np.asarray(model(seq)[0, len(prompt) - 1:-1], np.float64)
    logp = _log_softmax(logits)
    top_ids = np.argsort(-logp, axis=-1)[:, :5]
    assert np.asarray(c.top_ids).tolist() == top_ids.tolist()
    np.testing.assert_allclose(c.top_logprobs, np.take_along_axis(logp, top_ids, -1), atol=2e-5)
    np.testing.assert_allclose(c.token_logprobs, logp[np.arange(10), c.token_ids], atol=2e-5)
    tempered = _log_softmax(logits / 0.7)
    assert np.abs(np.take_along_axis(tempered, top_ids, -1) - c.top_logprobs).max() > 1e-2


@pytest.mark.parametrize("policy_batch", [False, True])
def test_tail_and_policy_on_a_mesh_equal_unsharded(policy_batch):
    """Rows over `data`, the head's vocabulary over `tensor` (8 fake devices): the tail's scatter
    and complement logsumexp cross the vocabulary shards; loss and gradients as on one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from distill.parallel import make_mesh

    rng = np.random.default_rng(11)
    b, t, d, v, k = 4, 8, 8, 32, 4
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.float32)
    ids = np.stack([rng.permutation(v)[:k] for _ in range(b * t)]).reshape(b, t, k)
    lps = np.log(rng.dirichlet(np.ones(k + 1), (b, t))[..., :k]).astype(np.float32)
    teacher = TeacherTopK(jnp.asarray(ids, jnp.int32), jnp.asarray(lps))
    policy = PolicyTerm(jnp.asarray(rng.normal(size=(b, t)) - 3.0, jnp.float32),
                        jnp.asarray(rng.normal(size=(b, t)), jnp.float32))

    def loss(h, w, teacher, policy):
        return chunked_loss(h, lambda x: x @ w, targets, mask, teacher, alpha=0.5, chunk=4,
                            div=Divergence("jsd", 0.5, tail=True),
                            policy=policy if policy_batch else None)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want, want_grads = fn(hidden, w, teacher, policy)
    mesh = make_mesh({"data": 2, "tensor": 4})
    rows = NamedSharding(mesh, P("data"))
    got, got_grads = fn(jax.device_put(hidden, rows),
                        jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))),
                        jax.device_put(teacher, rows), jax.device_put(policy, rows))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w_ in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-6)
