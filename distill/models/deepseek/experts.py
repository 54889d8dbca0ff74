"""DeepSeekMoE: group-limited sigmoid routing and routed experts that cost in proportion to top-k.

Letters: M tokens (B * T flattened), K experts chosen per token (num_experts_per_tok), E routed
experts, G expert groups, A = M * K token-expert assignments, C capacity (rows per expert per round).

Routing follows transformers' `DeepseekV3TopkRouter` (and DeepSeek's `Gate`): sigmoid scores; a
per-expert correction bias is added for choosing only; a group's score is the sum of its two best
biased scores; the best `topk_group` groups stay; the top K experts of those are chosen; the
weights are the unbiased scores, normalised if `norm_topk_prob`, times `routed_scaling_factor`.

Dispatch never computes every expert for every token:
  gather    few tokens (M * K < E, e.g. decode): read only the chosen experts' weights;
  capacity  sort assignments by expert into an [E, C, D] buffer and run one batched einsum per
            round; C ~ capacity_factor * A / E, and extra rounds take whatever overflowed, so
            nothing is ever dropped (the round count follows the busiest expert); its gradient
            replays the rounds (a custom VJP), so training on CPU uses it too;
  ragged    `jax.lax.ragged_dot` grouped matmuls over the sorted assignments (GPU/TPU kernels).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Routing


def route(x_md: jax.Array, w_router_de: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool, scaling: float) -> tuple[jax.Array, jax.Array]:
    """Routing weights [M, K] (float32) and expert ids [M, K] (int32) for tokens x [M, D]."""
    m, e = x_md.shape[0], w_router_de.shape[-1]
    logits_me = jnp.einsum("md,de->me", x_md.astype(jnp.float32), w_router_de.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)  # selection is sensitive: full f32
    scores_me = jax.nn.sigmoid(logits_me)
    choice_me = scores_me + bias_e.astype(jnp.float32)
    grouped = choice_me.reshape(m, n_group, e // n_group)
    group_scores_mg = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, top_groups = jax.lax.top_k(group_scores_mg, topk_group)
    keep_mg = jnp.any(jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_), axis=1)
    keep_me = jnp.repeat(keep_mg, e // n_group, axis=-1)
    _, idx_mk = jax.lax.top_k(jnp.where(keep_me, choice_me, -jnp.inf), top_k)
    w_mk = jnp.take_along_axis(scores_me, idx_mk, axis=-1)
    if norm_topk_prob:
        w_mk = w_mk / (jnp.sum(w_mk, axis=-1, keepdims=True) + 1e-20)
    return w_mk * scaling, idx_mk.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Dispatch


def resolve_dispatch(mode: str) -> str:
    """'auto' -> 'ragged' on GPU/TPU, 'capacity' elsewhere (CPU)."""
    if mode != "auto":
        return mode
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "capacity"


def routed_experts(x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd, *, dispatch: str = "auto",
                   capacity_factor: float = 2.0) -> jax.Array:
    """sum_k w[m, k] * expert_{idx[m, k]}(x[m]) for tokens x [M, D]; SwiGLU experts. Returns [M, D]."""
    m, k = idx_mk.shape
    e = w_gate_edf.shape[0]
    ws = (w_gate_edf, w_up_edf, w_down_efd)
    if m * k < e:
        return _gathered(x_md, w_mk, idx_mk, *ws)
    mode = resolve_dispatch(dispatch)
    if mode == "capacity":
        return _capacity(x_md, w_mk, idx_mk, *ws, capacity_factor)
    if mode == "ragged":
        return _ragged(x_md, w_mk, idx_mk, *ws)
    raise ValueError(f"unknown moe_dispatch {dispatch!r}")


def _swiglu_batched(x_ecd, w_gate_edf, w_up_edf, w_down_efd):
    """Each expert's SwiGLU on its own rows: [E, C, D] -> [E, C, D]."""
    dt = x_ecd.dtype
    gate = jnp.einsum("ecd,edf->ecf", x_ecd, w_gate_edf.astype(dt))
    up = jnp.einsum("ecd,edf->ecf", x_ecd, w_up_edf.astype(dt))
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down_efd.astype(dt))


def _gathered(x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd):
    """Read only the K chosen experts of each token: weight traffic M * K * 3 * D * F."""
    dt = x_md.dtype
    gate = jnp.einsum("md,mkdf->mkf", x_md, w_gate_edf[idx_mk].astype(dt))
    up = jnp.einsum("md,mkdf->mkf", x_md, w_up_edf[idx_mk].astype(dt))
    out_mkd = jnp.einsum("mkf,mkfd->mkd", jax.nn.silu(gate) * up, w_down_efd[idx_mk].astype(dt))
    return jnp.einsum("mkd,mk->md", out_mkd, w_mk.astype(dt))


def _sort_by_expert(idx_mk, e):
    """Assignment ids sorted by expert (stable) [A], and assignments per expert [E]."""
    flat = idx_mk.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=e)


def _capacity(x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd, capacity_factor):
    """Rounds of [E, C, D] buffers over the expert-sorted assignments until all are done."""
    return _capacity_vjp(capacity_factor, x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd)


def _capacity_plan(idx_mk, e, capacity_factor):
    """(C, assignment ids sorted by expert [A], assignments per expert [E], first sorted slot of
    each expert [E], number of rounds)."""
    c = max(1, math.ceil(capacity_factor * idx_mk.size / e))
    order_a, counts_e = _sort_by_expert(idx_mk, e)
    return c, order_a, counts_e, jnp.cumsum(counts_e) - counts_e, (jnp.max(counts_e) + c - 1) // c


def _capacity_round(r, plan, y_md, x_md, w_mk, w_gate_edf, w_up_edf, w_down_efd):
    """y [M, D] (float32) plus round r's contribution: rows r*C .. r*C + C - 1 of every expert."""
    c, order_a, counts_e, starts_e, _ = plan
    d, k = x_md.shape[1], w_mk.shape[1]
    pos_c = r * c + jnp.arange(c)
    valid_ec = pos_c[None, :] < counts_e[:, None]
    a_ec = order_a[jnp.where(valid_ec, starts_e[:, None] + pos_c[None, :], 0)]
    tok_ec = a_ec // k
    out_ecd = _swiglu_batched(x_md[tok_ec], w_gate_edf, w_up_edf, w_down_efd)
    scale_ec = jnp.where(valid_ec, w_mk.reshape(-1)[a_ec].astype(jnp.float32), 0.0)
    contrib = (out_ecd.astype(jnp.float32) * scale_ec[..., None]).reshape(-1, d)
    return y_md.at[tok_ec.reshape(-1)].add(contrib)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _capacity_vjp(capacity_factor, x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd):
    e = w_gate_edf.shape[0]
    plan = _capacity_plan(idx_mk, e, capacity_factor)
    ws = (w_gate_edf, w_up_edf, w_down_efd)

    def one_round(carry):
        r, y_md = carry
        return r + 1, _capacity_round(r, plan, y_md, x_md, w_mk, *ws)

    _, y = jax.lax.while_loop(lambda carry: carry[0] < plan[-1], one_round,
                              (jnp.int32(0), jnp.zeros(x_md.shape, jnp.float32)))
    return y.astype(x_md.dtype)


def _capacity_fwd(capacity_factor, x_md, w_mk, idx_mk, *ws):
    y = _capacity_vjp(capacity_factor, x_md, w_mk, idx_mk, *ws)
    return y, (x_md, w_mk, idx_mk, ws)


def _capacity_bwd(capacity_factor, res, dy_md):
    """The same rounds again, each one's VJP applied to the output's cotangent and summed: the
    round loop's trip count depends on the routing, so reverse mode cannot differentiate the
    while_loop itself; every round is recomputed (as under remat) instead of stored."""
    x_md, w_mk, idx_mk, ws = res
    plan = _capacity_plan(idx_mk, ws[0].shape[0], capacity_factor)
    dy_md = dy_md.astype(jnp.float32)
    diff = (x_md, w_mk, *ws)
    zeros_md = jnp.zeros(x_md.shape, jnp.float32)

    def one_round(carry):
        r, grads = carry
        _, vjp = jax.vjp(lambda *a: _capacity_round(r, plan, zeros_md, *a), *diff)
        return r + 1, jax.tree.map(jnp.add, grads, vjp(dy_md))

    _, grads = jax.lax.while_loop(lambda carry: carry[0] < plan[-1], one_round,
                                  (jnp.int32(0), jax.tree.map(jnp.zeros_like, diff)))
    dx, dw, *dws = grads
    return (dx, dw, None, *dws)


_capacity_vjp.defvjp(_capacity_fwd, _capacity_bwd)


def _ragged(x_md, w_mk, idx_mk, w_gate_edf, w_up_edf, w_down_efd):
    """Grouped matmuls over the expert-sorted assignments (one group per expert)."""
    (m, d), k, e = x_md.shape, idx_mk.shape[1], w_gate_edf.shape[0]
    dt = x_md.dtype
    order_a, counts_e = _sort_by_expert(idx_mk, e)
    tok_a = order_a // k
    x_ad = x_md[tok_a]
    gate = jax.lax.ragged_dot(x_ad, w_gate_edf.astype(dt), counts_e)
    up = jax.lax.ragged_dot(x_ad, w_up_edf.astype(dt), counts_e)
    out_ad = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_efd.astype(dt), counts_e)
    out_ad = out_ad.astype(jnp.float32) * w_mk.reshape(-1)[order_a][:, None]
    return jnp.zeros((m, d), jnp.float32).at[tok_a].add(out_ad).astype(dt)
