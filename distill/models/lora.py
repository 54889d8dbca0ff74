"""LoRA adapters on a dense student's projections (Hu et al. 2021; rsLoRA, Kalajdzievski 2023),
optionally over a quantised frozen base (QLoRA, `distill.models.quant`).

An adapter is declared with the model (`adapt`, called by `DenseDecoder.__init__` from its
config's `lora` / `quantize`, or on a loaded base): A [L, *in, R] and B [L, R, *out] stacked on
the layer axis like the weight they adapt, float32 `nnx.LoRAParam`s (the variable type the
trainer filters on), the rank axis unsharded. A starts as PEFT's default (kaiming-uniform,
U(-1/sqrt(in), 1/sqrt(in))), B at zero, so a fresh adapter leaves the model's output unchanged
bit for bit. A projection y = x W becomes y = x W + scale * (x A) B, scale = alpha / R (alpha /
sqrt(R) with rslora), the order of PEFT's `lora_B(lora_A(x)) * scaling`.

Dimension alphabet: as `distill.models.layers`, plus R the adapter rank.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import Field, field_validator

from distill.config import Frozen
from distill.errors import DistillError
from distill.models.quant import Quantized, QuantName


class Target(NamedTuple):
    """Where a target projection lives: its module (attn / mlp), the native weight, how many of
    the weight's axes after L are its input axes, and its Hugging Face module name."""

    module: str
    weight: str
    n_in: int
    hf: str


TARGETS: dict[str, Target] = {
    "q": Target("attn", "wq_dnh", 1, "self_attn.q_proj"),
    "k": Target("attn", "wk_dkh", 1, "self_attn.k_proj"),
    "v": Target("attn", "wv_dkh", 1, "self_attn.v_proj"),
    "o": Target("attn", "wo_nhd", 2, "self_attn.o_proj"),
    "gate": Target("mlp", "w_gate_df", 1, "mlp.gate_proj"),
    "up": Target("mlp", "w_up_df", 1, "mlp.up_proj"),
    "down": Target("mlp", "w_down_fd", 1, "mlp.down_proj"),
}
TargetName = Literal[tuple(TARGETS)]  # type: ignore[valid-type]


class LoraConfig(Frozen):
    """`student.lora`: the adapters of a LoRA student."""

    rank: int = Field(16, gt=0)  # R
    alpha: float = Field(32.0, gt=0)
    targets: tuple[TargetName, ...] = tuple(TARGETS)  # the projections that get an adapter
    # PEFT's lora_dropout; only 0 for now (the forward carries no random key yet). Thinking
    # Machines' "LoRA Without Regret" (2025) and Tunix's recipes train without it.
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = False  # scale alpha / sqrt(R) instead of alpha / R

    @field_validator("dropout")
    @classmethod
    def _no_dropout_yet(cls, p: float) -> float:
        if p:
            raise ValueError("LoRA dropout is not supported yet: use 0 (the default)")
        return p

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Adapter(nnx.Module):
    """The A and B of one stacked projection; `__call__` (one layer's slice inside the scan)
    gives scale * (x A) B in x's dtype."""

    def __init__(self, w_shape: tuple[int, ...], names: tuple, n_in: int, cfg: LoraConfig,
                 key: jax.Array):
        layers, ins, outs = w_shape[0], w_shape[1:1 + n_in], w_shape[1 + n_in:]
        bound = 1 / math.sqrt(math.prod(ins))  # PEFT's kaiming_uniform_(a=sqrt(5))
        a = jax.random.uniform(key, (layers, *ins, cfg.rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=(*names[:1 + n_in], "lora_rank"),
                                    eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((layers, cfg.rank, *outs), jnp.float32),
                                    out_sharding=(names[0], "lora_rank", *names[1 + n_in:]),
                                    eager_sharding=False)
        self.n_in, self.scale = n_in, cfg.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        xa = jnp.tensordot(x, self.lora_a[...].astype(dt), axes=self.n_in)  # [..., R]
        return jnp.tensordot(xa, self.lora_b[...].astype(dt), axes=1) * jnp.asarray(self.scale, dt)

    def delta(self) -> jax.Array:
        """scale * A B for every layer, float32 [L, *in, *out] (the merge)."""
        return jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(
            self.lora_a[...], self.lora_b[...]) * self.scale


def adapter_attr(target: str) -> str:
    """The attribute of the attention / MLP module that holds a target's adapter."""
    return f"{target}_lora"


def plus_adapter(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y plus the target's adapter applied to x (y unchanged when the target has none)."""
    adapter = getattr(module, adapter_attr(target), None)
    return y if adapter is None else y + adapter(x)


def has_adapters(module: nnx.Module) -> bool:
    return any(getattr(module, adapter_attr(t), None) is not None for t in TARGETS)


def adapt(model: nnx.Module, lora: LoraConfig | None, quantize: QuantName, key: jax.Array):
    """Give a dense model's blocks adapters (`lora`) and a quantised frozen base (`quantize`:
    every one of the seven projections, the adapters' targets or not); the model's config is
    updated to say so. Returns the model."""
    blocks = getattr(model, "blocks", None)
    if not all(hasattr(blocks, m) for m in ("attn", "mlp")) or model.config.family not in (
            "llama", "qwen2"):
        raise DistillError("LoRA / QLoRA students are dense (Llama / Qwen2) models; LoRA on a "
                           "MoE model is not supported yet")
    if quantize != "none":
        for t in TARGETS.values():
            module = getattr(blocks, t.module)
            w = getattr(module, t.weight)
            if not isinstance(w, Quantized):
                names = w.get_metadata().get("out_sharding")
                setattr(module, t.weight, Quantized(w[...], names, quantize))
    if lora is not None:
        for i, name in enumerate(lora.targets):
            t = TARGETS[name]
            module = getattr(blocks, t.module)
            w = getattr(module, t.weight)
            if isinstance(w, Quantized):  # the codes of nf4 hold two elements a byte
                shape = (*w.codes.shape[:-1], w.scales.shape[-1] * w.block)
                names = w.codes.get_metadata().get("out_sharding")
            else:
                shape, names = w.shape, w.get_metadata().get("out_sharding")
            setattr(module, adapter_attr(name),
                    Adapter(shape, names, t.n_in, lora, jax.random.fold_in(key, i)))
    model.config = model.config.model_copy(update={"lora": lora, "quantize": quantize})
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """The model with every adapter merged into its weight (W + scale * A B, in float32, cast
    once to the weight's dtype) and removed: a plain model of the base's config. The base must
    not be quantised (merge into the unquantised base: `distill.runs.load_run(merge=True)`)."""
    blocks = model.blocks
    for name, t in TARGETS.items():
        module = getattr(blocks, t.module)
        adapter = getattr(module, adapter_attr(name), None)
        w = getattr(module, t.weight)
        if isinstance(w, Quantized):
            raise DistillError("merging adapters into a quantised base: load the unquantised base")
        if adapter is not None:
            w.set_value((w[...].astype(jnp.float32) + adapter.delta()).astype(w.dtype))
            setattr(module, adapter_attr(name), None)
    model.config = model.config.model_copy(update={"lora": None, "quantize": "none"})
    return model
