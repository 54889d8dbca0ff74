"""The optimizer: AdamW with warmup then cosine or linear decay, global-norm clipping, and no
weight decay on norms and biases."""

from __future__ import annotations

from typing import Literal

import jax
import optax
from pydantic import Field

from distill.config import Frozen


class OptimConfig(Frozen):
    lr: float = Field(1e-5, gt=0)  # peak learning rate
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # final lr as a fraction of the peak
    weight_decay: float = Field(0.0, ge=0)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = Field(1.0, gt=0)  # global gradient-norm clip; None: off


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then decay to `lr * min_lr_ratio` at `total_steps`."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _leaf_name(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def decay_mask(params):
    """True where weight decay applies: weight matrices and embeddings, not norm scales or biases
    (names like `attn_norm_d`, `bq_nh`; layer stacking makes rank useless for telling them apart)."""
    def decays(path, _):
        name = _leaf_name(path)
        return not ("norm" in name or name.startswith("b") or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW under the schedule (the state lives in float32)."""
    adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
