"""The training run config (configs/runs/*.yaml for `distill train` and `distill plan`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from distill.backends import SamplerConfig
from distill.config import Frozen, InputPath, OutputPath
from distill.data.prompts import PromptsConfig
from distill.errors import DistillError
from distill.inference import EngineConfig
from distill.losses import DIVERGENCES, Divergence, tail_problem
from distill.models.config import AttentionName, ContextParallelName, RematName
from distill.models.lora import LoraConfig
from distill.models.quant import QuantName
from distill.parallel import parse_mesh
from distill.train.data import DataConfig
from distill.train.optim import OptimConfig


class StudentConfig(Frozen):
    """Where the student starts: any MODEL path (HF directory, GGUF, students/<run>) or a preset
    YAML (random init); `tokenizer` is required with a preset."""

    init: InputPath
    tokenizer: InputPath | None = None
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and optimizer state
    # compute dtype; "auto": bfloat16 on TPU / GPU (the R1-distill recipe), float32 on CPU. The
    # loss is float32 either way.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    remat: RematName | None = None  # None: the model's own
    attention: AttentionName | None = None  # None: the model's own ("auto")
    context_parallel: ContextParallelName | None = None  # None: the model's own ("all_gather")
    # config fields changed on the loaded model that leave its weights' shapes alone, e.g. the
    # R1-Distill students' longer context: {max_position_embeddings: 131072}
    config_overrides: dict[Literal["max_position_embeddings", "rope_theta", "bos_token_id",
                                   "eos_token_id"], Any] = {}
    # a LoRA student: adapters on the frozen base `init` (`distill.models.lora`); the optimizer
    # and the checkpoints hold the adapters only. `quantize` stores the frozen base quantised
    # (QLoRA: nf4 or int8, `distill.models.quant`); it needs `lora`.
    lora: LoraConfig | None = None
    quantize: QuantName = "none"

    @field_validator("quantize")
    @classmethod
    def _quantize_needs_lora(cls, quantize: str, info: ValidationInfo) -> str:
        if quantize != "none" and info.data.get("lora") is None:
            raise ValueError("a quantised base trains nothing by itself: set student.lora too")
        return quantize

    def compute_dtype(self, platform: str) -> str:
        """The compute dtype on `platform` ("cpu", "gpu", "tpu")."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if platform == "cpu" else "bfloat16"

    def model_updates(self) -> dict:
        """The model-config fields this section changes (config_overrides and the runtime
        choices given)."""
        runtime = {k: getattr(self, k) for k in ("remat", "attention", "context_parallel")}
        return {**self.config_overrides, **{k: v for k, v in runtime.items() if v is not None}}


# "sft" (cross-entropy alone) or a registered divergence (`distill.losses.DIVERGENCES`)
LossName = Literal[("sft", *DIVERGENCES)]


class LossConfig(Frozen):
    """SFT cross-entropy, optionally mixed with logit distillation from the teacher's stored
    top-k log-probabilities: loss = (1 - alpha) CE + alpha KD. forward_kl / reverse_kl / jsd
    need the student to share the teacher's tokenizer; gold (matched-vocabulary KL plus ULD on
    the rest) and uld (sorted-probability distance alone) work across tokenizers too. The
    bounds of the divergence's hyperparameters are checked here, once. `tail_bucket` adds the
    teacher's mass outside its stored top-k as one more class (forward_kl / reverse_kl / jsd at
    temperature 1; see `distill.losses`)."""

    kind: LossName = "sft"
    alpha: float = Field(0.5, ge=0, le=1)  # ignored for sft
    beta: float = Field(0.5, ge=0, le=1)  # generalized JSD interpolation
    temperature: float = Field(1.0, gt=0)
    matched_weight: float = Field(1.0, ge=0)  # gold: the KL over entries that are student tokens
    unmatched_weight: float = Field(1.0, ge=0)  # gold: ULD over the teacher's other entries
    tail_bucket: bool = False  # the mass outside the teacher's top-k as one more class
    chunk: int = Field(1024, ge=1)  # sequence chunk of the loss head: never [B, T, V] logits at once

    @field_validator("tail_bucket")
    @classmethod
    def _tail_fits(cls, tail: bool, info: ValidationInfo) -> bool:
        problem = tail and tail_problem(info.data.get("kind", "sft"),
                                        info.data.get("temperature", 1.0))
        if problem:
            raise ValueError(problem)
        return tail

    def divergence(self) -> Divergence | None:
        """The teacher term's hyperparameters (every `Divergence` field, read from this config
        by name, `tail` from tail_bucket); None for sft."""
        if self.kind == "sft":
            return None
        names = {"tail": "tail_bucket"}
        return Divergence(**{f: getattr(self, names.get(f, f)) for f in Divergence._fields})


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
    # batches built and sent to the devices ahead, on a background thread (0: in the step loop)
    prefetch: int = Field(2, ge=0)
    seed: int = 0


OnPolicyLoss = Literal["auto", "reverse_kl", "forward_kl", "jsd", "sampled_reverse_kl"]


class OnPolicyConfig(Frozen):
    """On-policy distillation (the `onpolicy:` table): on a step drawn on-policy the student samples
    `group_size` completions of each of `prompts_per_step` prompts through the inference engine
    with its live weights (temperature 1, no top-k / top-p: the tokens really are the policy's),
    the teacher scores the student's tokens, and the step moves the student toward the teacher
    where the student actually goes (GKD, Agarwal et al. 2024; Thinking Machines 2025).

    `fraction` is GKD's lambda: the share of steps that are on-policy (drawn per step from the
    run's seed); the others are today's off-policy steps on the traces of `data:` (so 0 is
    off-policy KD alone, and 1 needs no traces). Losses, named by what they compute:
    - reverse_kl: KL(student || teacher) per token over the whole vocabulary (the teacher's
      `top_k` entries plus the rest as one class; top_k null: every id), in-process teacher;
    - forward_kl / jsd (`beta`): the same with the other direction / GKD's generalized JSD;
    - sampled_reverse_kl: the estimate on the sampled token only, log q(x) - log p(x) as the
      advantage of an importance-weighted policy gradient (what a served teacher, which returns
      the sampled tokens' log-probabilities, allows; across tokenizers, per aligned span);
    - auto: reverse_kl for an in-process teacher sharing the student's tokenizer, else
      sampled_reverse_kl.
    `reward_weight` adds the verifier's reward (the answer checked against the prompt's
    reference, `distill.verify`), centred over the prompt's group, to every token's advantage."""

    prompts: PromptsConfig
    teacher: SamplerConfig
    fraction: float = Field(1.0, ge=0, le=1)
    group_size: int = Field(4, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    loss: OnPolicyLoss = "auto"
    beta: float = Field(0.5, ge=0, le=1)
    top_k: int | None = Field(None, ge=1)  # teacher entries per token (null: the whole vocabulary)
    reward_weight: float = Field(0.0, ge=0)
    system: str | None = None
    engine: EngineConfig = EngineConfig(slots=64)

    def rows(self) -> int:
        """Sequences per on-policy step."""
        return self.prompts_per_step * self.group_size


class DistributedConfig(Frozen):
    """Multi-host: unset fields come from the environment (JAX's own cluster detection, or
    DISTILL_COORDINATOR / DISTILL_NUM_PROCESSES / DISTILL_PROCESS_ID)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # a process unheard of this long is lost: the others stop with one line (none: 60 s)
    lost_after_s: int | None = Field(None, ge=1)


class TrainConfig(Frozen):
    name: str | None = None  # students/<name>; default: the config file's stem
    student: StudentConfig
    data: DataConfig | None = None  # the traces; needed unless every step is on-policy
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    mesh: str | None = None  # "data=1,fsdp=8,tensor=1"; None: every device on fsdp
    distributed: DistributedConfig | None = None
    output_root: OutputPath = Field("students", validate_default=True)  # runs: output_root/<name>
    onpolicy: OnPolicyConfig | None = None

    def step_shape(self, seq_len: int | None = None) -> tuple[int, int]:
        """(rows, row length) of a training step: the traces' batch, else the on-policy rows
        (their length: `seq_len`, default the completion budget plus 1,024 prompt tokens)."""
        if self.data is not None:
            return self.data.batch_size, self.data.seq_len
        return self.onpolicy.rows(), seq_len or self.onpolicy.max_new_tokens + 1024

    @model_validator(mode="after")
    def _has_data(self) -> TrainConfig:
        if self.data is None and (self.onpolicy is None or self.onpolicy.fraction < 1):
            raise ValueError("data: the traces to train on are needed (only a run whose every "
                             "step is on-policy, onpolicy.fraction 1, goes without)")
        if self.data is None and self.train.steps is None:
            raise ValueError("train.steps: an on-policy run without traces has no epochs; "
                             "set the number of steps")
        return self

    @field_validator("mesh")
    @classmethod
    def _mesh_parses(cls, mesh: str | None) -> str | None:
        if mesh is not None:
            try:
                parse_mesh(mesh)
            except DistillError as e:
                raise ValueError(str(e)) from None
        return mesh


# What `distill train` checks of a step's shape before it allocates anything; `distill plan`
# applies exactly the same checks, so a plan never passes a config that train refuses.


def check_layout(batch_size: int, grad_accum: int, mesh: Mapping[str, int], source: str,
                 seq_len: int | None = None) -> int:
    """Every micro-batch (`batch_size / grad_accum` rows) splits evenly over the mesh's batch
    shards (data x fsdp), and each row's `seq_len` slots over its context axis. Returns the rows
    of one micro-batch; errors start with `source`."""
    context = mesh.get("context", 1)
    if seq_len is not None and seq_len % context:
        raise DistillError(f"{source}: data.seq_len {seq_len} does not split over the mesh's "
                           f"context={context} devices (use a multiple of {context})")
    if batch_size % grad_accum:
        raise DistillError(f"{source}: train.grad_accum {grad_accum} must divide "
                           f"data.batch_size {batch_size}")
    shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    micro = batch_size // grad_accum
    if micro % shards:
        fits = [a for a in range(1, grad_accum + 1) if batch_size % a == 0
                and (batch_size // a) % shards == 0]
        hint = (f"set train.grad_accum to {max(fits)}" if fits else
                f"use a data.batch_size that is a multiple of {shards * grad_accum}")
        raise DistillError(f"{source}: data.batch_size {batch_size} / train.grad_accum "
                           f"{grad_accum} = {micro} rows per micro-batch, which the mesh's "
                           f"data x fsdp = {shards} batch shards do not divide ({hint})")
    return micro


def check_seq_len(seq_len: int, model_cfg, source: str) -> None:
    """A row of `seq_len` slots fits the student's positions (errors start with `source`)."""
    limit = model_cfg.max_position_embeddings
    if seq_len > limit:
        raise DistillError(f"{source}: data.seq_len {seq_len} is above the student's "
                           f"max_position_embeddings {limit} (raise that, in a training config "
                           "with student.config_overrides, or lower seq_len)")
