"""The training objective over a packed batch: SFT cross-entropy mixed with logit distillation
as the run's `loss:` table says, on top of the pure loss functions of `distill.losses`."""

from __future__ import annotations

from distill import losses
from distill.train.config import LossConfig


def make_loss_fn(cfg: LossConfig):
    """(model, batch) -> (loss summed over target tokens, metric sums incl. tokens)."""
    alpha = 0.0 if cfg.kind == "sft" else cfg.alpha

    def loss_fn(model, batch):
        hidden = model.hidden(batch["tokens_bt"], batch["positions_bt"], batch["segment_ids_bt"])
        teacher = None
        if "top_ids_btk" in batch and cfg.kind != "sft":
            teacher = losses.TeacherTopK(batch["top_ids_btk"], batch["top_logprobs_btk"])
        loss, m = losses.chunked_loss(hidden, model.logits, batch["targets_bt"],
                                      batch["loss_mask_bt"], teacher, kind=cfg.kind, alpha=alpha,
                                      beta=cfg.beta, temperature=cfg.temperature,
                                      matched_weight=cfg.matched_weight,
                                      unmatched_weight=cfg.unmatched_weight, chunk=cfg.chunk)
        t = m["tokens"]
        sums = {"tokens": t, "ce": m["ce"] * t, "accuracy": m["accuracy"] * t}
        if "kd" in m:
            sums["kd"] = m["kd"] * t
        return loss * t, sums

    return loss_fn
