"""The Llama / Qwen2 config (`family: llama | qwen2`)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from distill.models.config import DecoderConfig
from distill.models.lora import LoraConfig
from distill.models.quant import QuantName


class DenseConfig(DecoderConfig):
    """A Llama / Qwen2 decoder. Architecture fields keep their config.json names."""

    family: Literal["llama", "qwen2"]
    num_key_value_heads: int  # K
    head_dim: int | None = None  # H; None -> hidden_size // num_attention_heads
    # Qwen2 sliding-window fields: kept for export; a window in use is not supported.
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    # Runtime: adapters on the projections (a LoRA student) and the frozen base's storage
    # (`distill.models.lora`, `distill.models.quant`); neither is part of the architecture.
    lora: LoraConfig | None = None
    quantize: QuantName = "none"

    @field_validator("num_key_value_heads")
    @classmethod
    def _kv_divides(cls, k: int, info) -> int:
        n = info.data.get("num_attention_heads")
        if n is not None and n % k:
            raise ValueError(f"num_attention_heads ({n}) must be a multiple of it ({k})")
        return k

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads
