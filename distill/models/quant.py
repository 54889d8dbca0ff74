"""Quantised frozen weights (the base of a QLoRA student): blockwise NF4 (QLoRA's 4-bit
NormalFloat, Dettmers et al. 2023) or int8, each block of the last axis scaled by its absolute
maximum. A `Quantized` module stands in a model where a stacked [L, ...] weight was; its codes and
scales keep the weight's leading axes, so inside the layer scan each layer sees its own slice and
is dequantised there, one layer at a time, never whole.

Storage per weight element: NF4 0.5 byte (two codes a byte) + 4 bytes per block of 64 (float32
absmax, no double quantisation): 0.5625 bytes; int8 1.0625 bytes.
Error bound (what the tests check): |w - dequantise(quantise(w))| <= absmax(block) * e, with
e = half the widest gap between neighbouring NF4 levels (0.1519), or 1/254 for int8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QuantName = Literal["none", "nf4", "int8"]
FORMATS = ("nf4", "int8")
BLOCK = 64  # elements of the last axis that share one scale (QLoRA's block size)

# The 16 NF4 levels (QLoRA, appendix E; bitsandbytes' table): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def error_bound(fmt: str) -> float:
    """The largest |w - dequantised w| per unit of the block's absolute maximum."""
    if fmt == "nf4":
        return float(np.max(np.diff(NF4_LEVELS))) / 2
    return 1 / 254


class QuantCodes(nnx.Variable):
    """The integer codes of a quantised weight (frozen: not a Param, never trained)."""


class QuantScales(nnx.Variable):
    """The per-block absolute maxima of a quantised weight (frozen)."""


def block_size(last: int) -> int:
    """The block of the last axis: 64, or the largest divisor of `last` that divides 64."""
    return math.gcd(last, BLOCK)


def _quantise_slice(w: jax.Array, fmt: str, block: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales [..., last / block]) of one layer's slice."""
    w = w.astype(jnp.float32)
    blocks = w.reshape(*w.shape[:-1], -1, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    unit = blocks / jnp.where(absmax > 0, absmax, 1.0)
    if fmt == "int8":
        codes = jnp.round(unit * 127).astype(jnp.int8).reshape(w.shape)
    else:  # the nearest level: count the midpoints below
        mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        idx = jnp.searchsorted(mids, unit.reshape(w.shape)).astype(jnp.uint8)
        codes = idx[..., 0::2] | (idx[..., 1::2] << 4)  # two codes a byte, even index low
    return codes, absmax[..., 0]


def _dequantise(codes: jax.Array, scales: jax.Array, fmt: str, block: int, dtype) -> jax.Array:
    if fmt == "int8":
        unit = codes.astype(jnp.float32) / 127
    else:
        levels = jnp.asarray(NF4_LEVELS)
        pair = jnp.stack([levels[codes & 0xF], levels[codes >> 4]], axis=-1)
        unit = pair.reshape(*codes.shape[:-1], -1)
    blocks = unit.reshape(*unit.shape[:-1], -1, block) * scales[..., None]
    return blocks.reshape(unit.shape).astype(dtype)


class Quantized(nnx.Module):
    """A frozen stacked weight [L, ...] kept quantised; `dequantise(dtype)` gives the weight (of
    one layer inside the scan, where the codes and scales are that layer's slices)."""

    def __init__(self, w: jax.Array, names: Sequence[str | None], fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantisation {fmt!r}; choose from {FORMATS}")
        last = w.shape[-1]
        if fmt == "nf4" and last % 2:
            raise ValueError(f"nf4 packs two codes a byte: the last axis ({last}) must be even")
        self.fmt, self.block, self.dtype = fmt, block_size(last), str(w.dtype)
        # one layer at a time: a stacked weight is never widened to float32 whole
        codes, scales = jax.lax.map(lambda x: _quantise_slice(x, fmt, self.block), w)
        self.codes = QuantCodes(codes, out_sharding=tuple(names), eager_sharding=False)
        # the block axis is short (D / 64): kept whole on every device
        self.scales = QuantScales(scales, out_sharding=(*names[:-1], None), eager_sharding=False)

    def dequantise(self, dtype=None) -> jax.Array:
        return _dequantise(self.codes[...], self.scales[...], self.fmt, self.block,
                           jnp.dtype(dtype or self.dtype))


def weight(w, dtype) -> jax.Array:
    """A projection's weight in `dtype`: a parameter cast, or a quantised weight dequantised."""
    if isinstance(w, Quantized):
        return w.dequantise(dtype)
    return w[...].astype(dtype)
