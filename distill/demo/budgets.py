"""What `distill demo` trains, and for how long: its budgets (data sizes and schedules), the
teacher's and the student's shapes, and the students it distils (each a row of its table)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one model trains: `steps` of `batch_size` packed rows of `seq_len` tokens."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """The "SFT then on-policy" student: SFT on the traces for `sft_steps` of the student's
    steps, then the rest on-policy (`distill.train` `onpolicy:`): each step the student samples
    `group_size` completions of `prompts_per_step` fresh training prompts at temperature 1 and
    moves toward the in-process teacher's distribution on its own tokens, at `lr`. `loss` "auto":
    the reverse KL over the whole vocabulary where the student shares the teacher's tokenizer,
    else its sampled-token estimate on the byte-aligned spans of the two tokenizations."""

    sft_steps: int
    prompts_per_step: int
    group_size: int
    lr: float
    loss: str = "auto"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Data sizes and training schedules of one demo run. A 3-step problem with its solution is
    about 40 tokens: rows of 128 hold ~2.8 of them, rows of 48 one (at a third of the attention
    cost per token, which is what a student step spends most on here)."""

    chain_steps: int  # operations per arithmetic chain (3 in the full demo)
    train_problems: int  # training prompts (the teacher learns their worked solutions)
    teacher: Schedule
    student: Schedule  # each student: SFT, SFT + KD, SFT then on-policy, answers only
    trace_prompts: int  # training prompts the teacher answers for the students
    onpolicy: OnPolicy  # the on-policy phase samples training prompts past the traces' ones
    eval_prompts: int  # held-out prompts
    eval_n: int  # samples per held-out prompt (plus one greedy)
    eval_untrained: bool  # also evaluate the untrained student (the suite's baseline)


# The R1 regime on a 2-core CPU: the teacher (65.8% held-out pass@1) answers only the first
# `trace_prompts` training prompts, so SFT has few verified traces (272 correct of 432) and its
# student stays far below the teacher, while on-policy distillation needs prompts only and draws
# fresh ones. Calibration (code of 2026-12-07, the demo's 200 held-out prompts, pass@1 over 3
# samples, the demo student, batch 64, seed 0; paired 95% intervals against SFT for 300 steps):
#   SFT on the 272 traces: 100 steps 3.5%, 200 steps 11.0%, 300 steps 22.2% (the baseline);
#   SFT on 515 traces (864 prompts), 300 steps: 37.8%; on all 2,394 of 4,096: 74%
#   SFT 200 then on-policy 100 (reverse KL, 16 prompts x G 4, lr 1e-3): 14.3%, -7.8 (+/- 5.9);
#     reverse KL on own samples 0.93 -> 0.31, entropy 0.24 -> 0.11, length 28.5 -> 28.9 tokens
#   the same at lr 3e-4: 10.5%, -11.7 (+/- 5.7); SFT 100 then on-policy 200 at lr 1e-3 (a
#     prototype of the same loss): 6.7%; at lr 3e-3 the reverse KL stalled near its start
# SFT is still climbing steeply at 300 steps (11% -> 22% over its last 100), and an on-policy
# step moved pass@1 less than an SFT step on the same 272 memorised traces: at equal steps the
# on-policy row trails SFT alone in this budget (see the README's demo paragraph).
BUDGETS = {
    "full": Budget(chain_steps=3, train_problems=20000,
                   teacher=Schedule(steps=300, batch_size=24, seq_len=128, lr=3e-3),
                   student=Schedule(steps=300, batch_size=64, seq_len=48, lr=2e-3),
                   trace_prompts=432,
                   onpolicy=OnPolicy(sft_steps=200, prompts_per_step=16, group_size=4, lr=1e-3),
                   eval_prompts=200, eval_n=3, eval_untrained=False),
    # the test suite's demo: 2-step chains (about 32 tokens a problem), a fraction of the steps
    "quick": Budget(chain_steps=2, train_problems=1500,
                    teacher=Schedule(steps=100, batch_size=16, seq_len=128, lr=3e-3),
                    student=Schedule(steps=60, batch_size=32, seq_len=48, lr=3e-3),
                    trace_prompts=512,
                    onpolicy=OnPolicy(sft_steps=50, prompts_per_step=4, group_size=2, lr=1e-3),
                    eval_prompts=64, eval_n=2, eval_untrained=True),
}

TRAIN_SEED, EVAL_SEED = 0, 1
TOP_K = 8  # teacher log-probabilities stored per token, and used by the KD loss
MAX_NEW_TOKENS = 48  # a 3-step solution is at most ~40 completion tokens
TRACE_TEMPERATURE = 0.8
# The inference engine of every in-process model (traces, eval): the toy models' KV caches are
# small, so many slots, and a prefill budget that fills them in a few host visits
ENGINE = {"slots": 256, "prefill_budget": 8192}

# A DeepSeek-V3-shaped teacher: MLA attention, one dense layer, then MoE layers of 8 routed experts
# (top-2) and one shared expert. The vocabulary and special ids are the demo tokenizer's.
TEACHER = {
    "family": "deepseek_v3", "hidden_size": 128, "intermediate_size": 384,
    "moe_intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
    "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
    "norm_topk_prob": True, "max_position_embeddings": 256, "rope_theta": 10000.0,
    "rms_norm_eps": 1.0e-6, "tie_word_embeddings": False,
    # rows per expert per dispatch round = tokens x top-k / experts: with training's roughly
    # balanced routing an overflow round is cheaper than a buffer twice that size
    "moe_capacity_factor": 1.0,
}
# The student: a smaller dense Llama (GQA 2). Not Qwen2: transformers 5 always loads a qwen2
# model's tokenizer as its byte-level Qwen2Tokenizer, which cannot read the demo's SentencePiece one.
STUDENT = {
    "family": "llama", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rope_theta": 10000.0, "rms_norm_eps": 1.0e-6, "tie_word_embeddings": False,
}
STUDENTS = {  # run name: (what it trains on, loss section, what the table calls it)
    "student-sft": ("traces", {"kind": "sft"}, "student: SFT on traces"),
    "student-kd": ("traces", {"kind": "forward_kl", "alpha": 0.5, "tail_bucket": True},
                   "student: SFT + off-policy KD (top-8 + tail)"),
    "student-onpolicy": ("onpolicy", {"kind": "sft"}, "student: SFT then on-policy"),
    "student-answers": ("answers", {"kind": "sft"}, "student: answers only"),
}
# `--student-tokenizer other`: the students have a vocabulary of their own (`OTHER_PIECES`), so
# logit distillation goes through the alignment of the teacher's tokens to theirs (on-policy:
# the teacher scores the student's completions span by span)
CROSS_STUDENTS = {
    "student-sft": ("traces", {"kind": "sft"}, "student (own tokenizer): SFT on traces"),
    "student-gold": ("traces", {"kind": "gold", "alpha": 0.5},
                     "student (own tokenizer): SFT + GOLD (matched KL + ULD)"),
    "student-uld": ("traces", {"kind": "uld", "alpha": 0.5},
                    "student (own tokenizer): SFT + ULD"),
    "student-onpolicy": ("onpolicy", {"kind": "sft"},
                         "student (own tokenizer): SFT then on-policy"),
}
STUDENT_TOKENIZERS = ("shared", "other")
