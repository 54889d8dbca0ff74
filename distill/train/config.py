"""The training run config (configs/runs/*.yaml for `distill train` and `distill plan`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distill.config import Frozen
from distill.train.data import DataConfig
from distill.train.optim import OptimConfig


class StudentConfig(Frozen):
    """Where the student starts: any MODEL path (HF directory, GGUF, students/<run>) or a preset
    YAML (random init); `tokenizer` is required with a preset."""

    init: str
    tokenizer: str | None = None
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and optimizer state
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute (bfloat16 on TPU / GPU)
    remat: Literal["none", "full", "dots", "dots_no_batch"] | None = None  # None: the model's own
    # config fields changed on the loaded model that leave its weights' shapes alone, e.g. the
    # R1-Distill students' longer context: {max_position_embeddings: 131072}
    config_overrides: dict[Literal["max_position_embeddings", "rope_theta", "bos_token_id",
                                   "eos_token_id"], Any] = {}


class LossConfig(Frozen):
    """SFT cross-entropy, optionally mixed with logit distillation from the teacher's stored
    top-k log-probabilities (same tokenizer only): loss = (1 - alpha) CE + alpha KD."""

    kind: Literal["sft", "forward_kl", "reverse_kl", "jsd"] = "sft"
    alpha: float = Field(0.5, ge=0, le=1)  # ignored for sft
    beta: float = Field(0.5, ge=0, le=1)  # generalized JSD interpolation
    temperature: float = Field(1.0, gt=0)
    chunk: int = Field(1024, ge=1)  # sequence chunk of the loss head: never [B, T, V] logits at once


class LoopConfig(Frozen):
    grad_accum: int = Field(1, ge=1)  # micro-batches per step (each data.batch_size / grad_accum)
    steps: int | None = Field(None, ge=1)  # total optimizer steps; None: from epochs
    epochs: float = Field(2.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    async_checkpoints: bool = True
    seed: int = 0


class DistributedConfig(Frozen):
    """Multi-host: unset fields come from the environment (JAX's own cluster detection, or
    DISTILL_COORDINATOR / DISTILL_NUM_PROCESSES / DISTILL_PROCESS_ID)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


class TrainConfig(Frozen):
    name: str | None = None  # students/<name>; default: the config file's stem
    student: StudentConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    mesh: str | None = None  # "data=1,fsdp=8,tensor=1"; None: every device on fsdp
    distributed: DistributedConfig | None = None
    output_root: str = "students"

    @model_validator(mode="after")
    def _accum_divides(self) -> TrainConfig:
        if self.data.batch_size % self.train.grad_accum:
            raise ValueError(f"train.grad_accum {self.train.grad_accum} must divide "
                             f"data.batch_size {self.data.batch_size}")
        return self
