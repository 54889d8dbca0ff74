"""The training objective over a packed batch: SFT cross-entropy mixed with logit distillation
as the run's `loss:` table says, on top of the pure loss functions of `distill.losses`."""

from __future__ import annotations

from distill import losses
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
