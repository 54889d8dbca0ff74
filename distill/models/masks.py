"""What an attention mask is made of: the dense boolean [B, T, S] mask, and `MaskInfo`, its
O(T + S) description (slot indices, validity, segments) that the blockwise, fused and
context-parallel paths take instead.

Dimension alphabet: B batch, T query length, S key/cache length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


def attention_mask(
    q_slot_bt: jax.Array,
    k_slot_bs: jax.Array,
    k_valid_bs: jax.Array,
    q_segment_bt: jax.Array | None = None,
    k_segment_bs: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: causal by slot index, padding removed, documents kept apart by segment."""
    mask = (k_slot_bs[:, None, :] <= q_slot_bt[:, :, None]) & k_valid_bs[:, None, :]
    if q_segment_bt is not None:
        mask &= q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    return mask


class MaskInfo(NamedTuple):
    """What an attention mask is made of, O(T + S) instead of the [B, T, S] mask itself.

    Key s is visible to query t when k_slots[s] <= q_slots[t] (causal by slot index), k_valid[s],
    and (when segments are given) q_segments[t] == k_segments[s]. A full-sequence forward
    (`CausalLM.hidden`) makes one with slots 0..T-1 on both sides and k_valid = segments != 0,
    which is what the fused kernels assume. Only the mask: the attention setting travels beside
    it (`distill.models.attention.AttentionSettings`).
    """

    q_slots: jax.Array  # [B, T] int32
    k_slots: jax.Array  # [B, S] int32
    k_valid: jax.Array  # [B, S] bool
    q_segments: jax.Array | None = None  # [B, T] int, None = one document per row
    k_segments: jax.Array | None = None  # [B, S]

    def dense(self) -> jax.Array:
        """The boolean [B, T, S] mask `dot_product_attention` takes."""
        return attention_mask(*self)
