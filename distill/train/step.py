"""The training step: a pure function `step(state, batch) -> (state, metrics)`, compiled once with
explicit in/out shardings derived from the abstract state, the state donated.

The state holds the trainable variables only: every parameter for a full fine-tune, the adapters
(`nnx.LoRAParam`) for a LoRA student, whose frozen base is the step's third argument (not donated,
not differentiated, never in the optimizer or a checkpoint).

Gradient accumulation scans over micro-batches inside the step. The loss function returns a SUM
over target tokens with the token count, and the step divides by the global count, so accumulating
A micro-batches of b rows equals one batch of A*b rows (a per-micro-batch mean would weight short
micro-batches more).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill.parallel import params_sharding

Batch = dict[str, jax.Array]  # tokens_bt, targets_bt, loss_mask_bt, segment_ids_bt, positions_bt, ...
# (model, batch) -> (sum of the loss over target tokens, metrics incl. "tokens" and other sums)
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    params: Any  # nnx.State of the trainable variables (float32 master weights)
    opt_state: Any
    step: jax.Array  # int32 scalar


def trainable_filter(model: nnx.Module):
    """What the optimizer trains: the adapters of a LoRA student, else every parameter."""
    lora = getattr(model.config, "lora", None)
    return nnx.LoRAParam if lora is not None else nnx.Param


def split_trainable(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): the frozen rest is empty for a full fine-tune."""
    return nnx.split(model, trainable_filter(model), ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, TrainState, frozen) of a model."""
    graphdef, params, frozen = split_trainable(model)
    return graphdef, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)), frozen


def _micro_grads(graphdef, loss_fn: LossFn, params, frozen, batch: Batch):
    def f(p):
        return loss_fn(nnx.merge(graphdef, p, frozen), batch)

    (loss_sum, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, {**metrics, "loss_sum": loss_sum}


def make_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, schedule,
              accum: int = 1) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
    """The pure step function `step(state, batch, frozen)` (not yet jitted)."""

    def step(state: TrainState, batch: Batch, frozen) -> tuple[TrainState, dict]:
        if accum == 1:
            grads, sums = _micro_grads(graphdef, loss_fn, state.params, frozen, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def body(acc, mb):
                g, m = _micro_grads(graphdef, loss_fn, state.params, frozen, mb)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: _micro_grads(graphdef, loss_fn, state.params, frozen,
                                     jax.tree.map(lambda x: x[0], micro))))
            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        # in the parameters' dtype: bfloat16 parameters keep bfloat16 gradients and moments
        grads = jax.tree.map(lambda g: (g / tokens).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / tokens for k, v in sums.items() if k not in ("tokens",)}
        metrics.update(loss=sums["loss_sum"] / tokens, tokens=sums["tokens"], grad_norm=grad_norm,
                       lr=jnp.asarray(schedule(state.step), jnp.float32))
        metrics.pop("loss_sum")
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows over (data, fsdp), the sequence over context (replicated without one)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "context"))


def state_sharding(graphdef, tx, abstract_params, mesh: Mesh) -> TrainState:
    """Shardings of the whole TrainState: parameters by their logical names; optimizer moments
    like their parameter; counts and other non-parameter leaves replicated."""
    p_sh = params_sharding(abstract_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(p_sh, opt_sh, replicated)


def compile_step(step_fn, state_sh: TrainState, mesh: Mesh, frozen_sh, donate: bool = True):
    """jit with explicit shardings; the state is donated (updated in place), the frozen base
    (`frozen_sh`: its shardings, `params_sharding`) read."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sharding(mesh), frozen_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,) if donate else ())
