"""The training objective over a packed batch: SFT cross-entropy mixed with logit distillation
as the run's `loss:` table says (trace batches), or the on-policy objective (the student's own
samples), on top of the pure loss functions of `distill.losses`."""

from __future__ import annotations

from distill import losses
from distill.losses import Divergence
from distill.train.config import LossConfig


def make_loss_fn(cfg: LossConfig):
    """(model, batch) -> (loss summed over target tokens, metric sums incl. tokens)."""
    div = cfg.divergence()
    alpha = 0.0 if div is None else cfg.alpha  # ignored for sft

    def loss_fn(model, batch):
        hidden = model.hidden(batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"])
        teacher = None
        if "top_ids_btk" in batch and div is not None:
            teacher = losses.TeacherTopK(batch["top_ids_btk"], batch["top_logprobs_btk"])
        loss, m = losses.chunked_loss(hidden, model.logits, batch["targets_bt"],
                                      batch["loss_mask_bt"], teacher, div=div, alpha=alpha,
                                      chunk=cfg.chunk)
        t = m["tokens"]
        sums = {"tokens": t, "ce": m["ce"] * t, "accuracy": m["accuracy"] * t}
        if "kd" in m:
            sums["kd"] = m["kd"] * t
        return loss * t, sums

    return loss_fn


def make_onpolicy_loss_fn(div: Divergence | None, *, chunk: int = 1024):
    """(model, batch) -> (loss summed over target tokens, metric sums incl. tokens) of the
    on-policy objective (`distill.losses.chunked_loss` with a `PolicyTerm`): the importance-
    weighted policy-gradient term, plus the divergence `div` to the teacher's top-k when given.

    The batch carries tokens_bt, positions_bt, segment_ids_bt, targets_bt, loss_mask_bt,
    old_logprobs_bt and advantages_bt, and with `div` top_ids_btk / top_logprobs_btk. Metric
    sums (each mean times the token count, as `make_loss_fn`'s): tokens, pg, entropy, ratio and,
    with `div`, kd.
    """

    def loss_fn(model, batch):
        hidden = model.hidden(batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"])
        teacher = None
        if div is not None:
            teacher = losses.TeacherTopK(batch["top_ids_btk"], batch["top_logprobs_btk"])
        policy = losses.PolicyTerm(batch["old_logprobs_bt"], batch["advantages_bt"])
        loss, m = losses.chunked_loss(hidden, model.logits, batch["targets_bt"],
                                      batch["loss_mask_bt"], teacher, div=div, chunk=chunk,
                                      policy=policy)
        t = m["tokens"]
        sums = {"tokens": t} | {k: m[k] * t for k in ("pg", "entropy", "ratio", "kd") if k in m}
        return loss * t, sums

    return loss_fn
