"""Training losses against NumPy references: cross-entropy, top-k forward/reverse KL and generalized
JSD with temperature, the alpha mix, and the sequence-chunked head (values, gradients, memory)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill.config import validate
from distill.errors import DistillError
from distill.losses import (
    DIVERGENCES,
    Divergence,
    PolicyTerm,
    TeacherTopK,
    chunked_loss,
    cross_entropy,
    distill_loss,
    kd_loss,
)
from distill.models.families import load_model_config
from distill.pretrained import init_model
from distill.train.config import LossConfig

ROOT = Path(__file__).resolve().parents[1]
B, T, V, K, D = 2, 7, 13, 4, 5


@pytest.fixture(scope="module")
def batch():
    """Random logits, targets, a mask with holes, and a teacher top-k with absent entries."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.25).astype(np.float32)
    mask[0, 0] = 1.0
    ids = np.stack([np.stack([rng.choice(V, K, replace=False) for _ in range(T)])
                    for _ in range(B)]).astype(np.int32)
    lps = np.log(rng.dirichlet(np.ones(K + 2), size=(B, T))[..., :K]).astype(np.float32)
    lps[0, 1, -1] = -np.inf  # one entry absent
    lps[1, 2, :] = -np.inf  # a position with no teacher at all
    mask[1, 2] = 1.0
    return logits, targets, mask, ids, lps


# --------------------------------------------------------------------------------- references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_ce(logits, targets, mask):
    logp = np_log_softmax(logits)
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum()


def ref_uld(p, q):
    """sum |sorted p - sorted q| over the len(q) largest of each."""
    return np.abs(np.sort(p)[::-1][:len(q)] - np.sort(q)[::-1]).sum()


def ref_kd(logits, ids, lps, mask, kind, beta, tau, w_matched=1.0, w_unmatched=1.0):
    """Loop over positions, in float64: the module docstring's definitions written out."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            valid = np.isfinite(lps[b, t])
            if not mask[b, t] or not valid.any():
                continue
            k_ids = ids[b, t][valid]
            log_q = np_log_softmax(lps[b, t][valid] / tau)
            p_full = np.exp(np_log_softmax(logits[b, t] / tau))
            log_p = np.log(p_full[np.maximum(k_ids, 0)])  # full-vocabulary student
            log_r = np_log_softmax(logits[b, t][k_ids] / tau)  # student restricted to the top-k
            q, r = np.exp(log_q), np.exp(log_r)
            matched = k_ids >= 0
            if kind == "uld":
                total += ref_uld(p_full, q)
                count += 1
                continue
            if kind == "gold":
                kl = (q * (log_q - log_p))[matched].sum() * tau**2
                rest = np.delete(p_full, k_ids[matched])  # the student outside the matched ids
                total += w_matched * kl + w_unmatched * ref_uld(rest, q[~matched])
                count += 1
                continue
            if kind == "forward_kl" or (kind == "jsd" and beta == 0):
                d = (q * (log_q - log_p)).sum()
            elif kind == "reverse_kl" or beta == 1:
                d = (r * (log_r - log_q)).sum()
            else:
                m = beta * q + (1 - beta) * r
                d = beta * (q * np.log(q / m)).sum() + (1 - beta) * (r * np.log(r / m)).sum()
            total += d * tau**2
            count += 1
    return total / count


# --------------------------------------------------------------------------------- values


def test_cross_entropy_matches_numpy(batch):
    logits, targets, mask, _, _ = batch
    loss, metrics = cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss, ref_ce(logits, targets, mask), rtol=1e-6)
    assert metrics["tokens"] == mask.sum()
    hits = (logits.argmax(-1) == targets) * mask
    np.testing.assert_allclose(metrics["accuracy"], hits.sum() / mask.sum(), rtol=1e-6)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1),
                                       ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_matches_numpy(batch, kind, beta, tau):
    logits, _, mask, ids, lps = batch
    loss, metrics = kd_loss(logits, ids, lps, mask, Divergence(kind, beta, tau))
    np.testing.assert_allclose(loss, ref_kd(logits, ids, lps, mask, kind, beta, tau), rtol=2e-5)
    assert metrics["kd_tokens"] == mask.sum() - 1  # the position with no teacher entry is left out


@pytest.mark.parametrize("kind,weights", [("gold", (1.0, 1.0)), ("gold", (0.3, 2.0)),
                                          ("uld", (1.0, 1.0))])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cross_tokenizer_kd_matches_numpy(batch, kind, weights, tau):
    """Teacher entries that are no student token (id -1) at a few positions."""
    logits, _, mask, ids, lps = batch
    ids = ids.copy()
    ids[0, 0, :2] = ids[1, 3, 1] = ids[0, 4, :] = -1
    loss, _ = kd_loss(logits, ids, lps, mask, Divergence(kind, temperature=tau,
                                                         matched_weight=weights[0],
                                                         unmatched_weight=weights[1]))
    want = ref_kd(logits, ids, lps, mask, kind, 0.5, tau, *weights)
    assert want > 0.05
    np.testing.assert_allclose(loss, want, rtol=2e-5)


def test_gold_with_one_tokenizer_is_forward_kl(batch):
    """Every entry matched: no ULD term, and the matched KL is today's forward KL (values and
    gradients; the weights of gold's unmatched term do not matter then)."""
    logits, _, mask, ids, lps = batch

    def kd(kind, **kw):
        div = Divergence(kind, temperature=1.5, **kw)
        return jax.value_and_grad(lambda z: kd_loss(z, ids, lps, mask, div)[0])(
            jnp.asarray(logits))

    (want, want_grad), (got, got_grad) = kd("forward_kl"), kd("gold", unmatched_weight=5.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_jsd_ends_are_forward_and_reverse_kl(batch):
    logits, _, mask, ids, lps = batch
    fwd = kd_loss(logits, ids, lps, mask, Divergence("forward_kl"))[0]
    rev = kd_loss(logits, ids, lps, mask, Divergence("reverse_kl"))[0]
    np.testing.assert_allclose(kd_loss(logits, ids, lps, mask, Divergence("jsd", beta=0.0))[0], fwd)
    np.testing.assert_allclose(kd_loss(logits, ids, lps, mask, Divergence("jsd", beta=1.0))[0], rev)
    assert float(fwd) > 0 and float(rev) > 0


def test_student_equal_to_teacher_has_zero_divergence(batch):
    """A student that puts the teacher's top-k probabilities on the same ids and nothing elsewhere."""
    _, _, mask, ids, lps = batch
    lps = np.where(np.isfinite(lps), lps, np.log(1e-3)).astype(np.float32)
    lps = np_log_softmax(lps).astype(np.float32)
    student = np.full((B, T, V), -1e4, np.float32)
    np.put_along_axis(student, ids, lps, axis=-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        div = Divergence(kind, temperature=1.5)
        assert abs(float(kd_loss(student, ids, lps, mask, div)[0])) < 1e-5


def test_alpha_zero_is_plain_sft(batch):
    logits, targets, mask, ids, lps = batch
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))
    ce, ce_metrics = cross_entropy(logits, targets, mask)
    for div in (None, *(Divergence(kind) for kind in DIVERGENCES)):  # sft and every divergence
        loss, metrics = distill_loss(logits, targets, mask, teacher, div=div, alpha=0.0)
        assert float(loss) == float(ce)
        assert set(metrics) == set(ce_metrics)


def test_alpha_mixes_ce_and_kd(batch):
    logits, targets, mask, ids, lps = batch
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))
    loss, metrics = distill_loss(logits, targets, mask, teacher,
                                 div=Divergence("jsd", beta=0.5, temperature=2.0), alpha=0.3)
    want = 0.7 * ref_ce(logits, targets, mask) + 0.3 * ref_kd(logits, ids, lps, mask, "jsd",
                                                              0.5, 2.0)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    assert metrics["kd_tokens"] == mask.sum() - 1


# --------------------------------------------------------------------------------- chunked head


def _head_problem(seed=1):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w_dv = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    return hidden, w_dv


@pytest.mark.parametrize("kind,alpha", [("sft", 0.0), ("forward_kl", 0.5), ("jsd", 0.5),
                                        ("reverse_kl", 1.0), ("gold", 0.5), ("uld", 0.7)])
def test_chunked_equals_unchunked_values_and_grads(batch, kind, alpha):
    _, targets, mask, ids, lps = batch
    if kind in ("gold", "uld"):
        ids = ids.copy()
        ids[0, 0, :2] = ids[1, 5, :] = -1
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))
    hidden, w_dv = _head_problem()
    kw = dict(div=None if kind == "sft" else Divergence(kind, beta=0.5, temperature=1.5),
              alpha=alpha)

    def full(h, w):
        return distill_loss(h @ w, targets, mask, teacher, **kw)[0]

    def chunked(h, w):  # T = 7 with chunk 3: the last chunk is padded
        return chunked_loss(h, lambda x: x @ w, targets, mask, teacher, chunk=3, **kw)[0]

    want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, w_dv)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, w_dv)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every value shape in a jaxpr, nested jaxprs (scan, remat) included."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _shapes(inner)
    return out


@pytest.mark.parametrize("tail,on_policy", [(False, False), (True, False), (True, True)])
def test_chunked_gradient_never_holds_full_logits(batch, tail, on_policy):
    """Off-policy, with the tail bucket (its [B, chunk, V] mask of the top-k ids), and the
    on-policy objective (its entropy over the vocabulary)."""
    _, targets, mask, ids, lps = batch
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))
    hidden, w_dv = _head_problem()
    policy = PolicyTerm(jnp.zeros((B, T)), jnp.ones((B, T))) if on_policy else None

    def chunked(h, w):
        return chunked_loss(h, lambda x: x @ w, targets, mask, teacher, chunk=3,
                            div=Divergence("jsd", tail=tail), alpha=0.5, policy=policy)[0]

    shapes = _shapes(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(hidden, w_dv).jaxpr)
    assert (B, 3, V) in shapes
    assert not any(len(s) >= 2 and s[-1] == V and np.prod(s) > B * 3 * V for s in shapes), shapes


def test_chunked_loss_with_model_head_and_nnx_grad():
    """The tiny Qwen2 student: logits(hidden(x)) is model(x), and the chunked loss over
    `model.logits` has the unchunked loss and gradients."""
    cfg = load_model_config(ROOT / "configs/students/tiny-qwen2.yaml")
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones((2, 24), jnp.float32).at[:, :5].set(0.0)
    split = nnx.jit(lambda m, x: (m.logits(m.hidden(x)), m(x)))(model, tokens)
    np.testing.assert_allclose(*split, rtol=1e-6, atol=1e-6)

    def full(m):
        return distill_loss(m(tokens), targets, mask)[0]

    def chunked(m):
        return chunked_loss(m.hidden(tokens), m.logits, targets, mask, chunk=8)[0]

    want, want_grads = nnx.jit(nnx.value_and_grad(full))(model)
    got, got_grads = nnx.jit(nnx.value_and_grad(chunked))(model)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------- bad input


def test_unknown_loss_name_is_one_clear_line():
    """The config offers "sft" and the registered divergences; a Python caller naming another
    divergence gets the registry's choices."""
    with pytest.raises(DistillError, match=r"^run.yaml: kind: Input should be 'sft', 'forward_kl', "
                                           r"'reverse_kl', 'jsd', 'gold' or 'uld' \(got 'kl'\)$"):
        validate(LossConfig, {"kind": "kl"}, "run.yaml")
    with pytest.raises(DistillError, match=r"^unknown distillation divergence 'kl'; choose one of "
                                           r"forward_kl, reverse_kl, jsd, gold, uld$"):
        distill_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)),
                     div=Divergence("kl"), alpha=0.5)


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 1.5, r"alpha: Input should be less than or equal to 1 \(got 1.5\)"),
    ("alpha", -0.1, r"alpha: Input should be greater than or equal to 0 \(got -0.1\)"),
    ("beta", 1.5, r"beta: Input should be less than or equal to 1 \(got 1.5\)"),
    ("temperature", 0.0, r"temperature: Input should be greater than 0 \(got 0.0\)"),
    ("matched_weight", -1.0, r"matched_weight: Input should be greater than or equal to 0"),
    ("unmatched_weight", -1.0, r"unmatched_weight: Input should be greater than or equal to 0"),
])
def test_out_of_bounds_loss_settings_are_one_clear_line(field, value, message):
    """Bounds are the config's, checked once by pydantic (the loss functions trust them)."""
    with pytest.raises(DistillError, match=rf"^run.yaml: {message}"):
        validate(LossConfig, {"kind": "jsd", field: value}, "run.yaml")


def test_bad_loss_settings_are_one_clear_line(batch):
    logits, targets, mask, _, _ = batch
    with pytest.raises(DistillError, match="needs the teacher's top-k log-probabilities"):
        distill_loss(logits, targets, mask, None, div=Divergence("forward_kl"), alpha=0.5)
    with pytest.raises(DistillError, match="'sft' has no teacher term"):
        distill_loss(logits, targets, mask, None, div=None, alpha=0.5)


def test_the_config_builds_the_divergence():
    """Every Divergence field is read from LossConfig by name; sft has none."""
    cfg = LossConfig(kind="gold", alpha=0.3, beta=0.2, temperature=2.0, matched_weight=0.5,
                     unmatched_weight=3.0)
    assert cfg.divergence() == Divergence("gold", 0.2, 2.0, 0.5, 3.0)
    assert LossConfig(kind="sft").divergence() is None


@pytest.mark.parametrize("kind", ["gold", "uld"])
def test_cross_tokenizer_loss_on_a_mesh_equals_unsharded(kind):
    """Rows over `data`, the head's vocabulary over `tensor` (8 fake devices): the top-k the ULD
    term takes over the vocabulary crosses the shards; loss and gradients as on one device."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from distill.parallel import make_mesh

    rng = np.random.default_rng(4)
    b, t, d, v, k = 4, 8, 8, 32, 4
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.float32)
    ids = rng.integers(0, v, (b, t, k)).astype(np.int32)
    ids[:, ::3, 1:] = -1  # unmatched entries
    lps = np.log(rng.dirichlet(np.ones(k), (b, t))).astype(np.float32)
    teacher = TeacherTopK(jnp.asarray(ids), jnp.asarray(lps))

    def loss(h, w, teacher):
        return chunked_loss(h, lambda x: x @ w, targets, mask, teacher, div=Divergence(kind),
                            alpha=0.5, chunk=4)[0]

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want, want_grads = fn(hidden, w, teacher)
    mesh = make_mesh({"data": 2, "tensor": 4})  # the trainer's kind of mesh
    rows = NamedSharding(mesh, P("data"))
    got, got_grads = fn(jax.device_put(hidden, rows),
                        jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))),
                        jax.device_put(teacher, rows))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w_ in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-6)
