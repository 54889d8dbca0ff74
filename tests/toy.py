"""Toy model directories for the trace, serving and training tests: a small byte-level BPE tokenizer
with the R1-Distill chat template, and tiny random Qwen2 / DeepseekV3 checkpoints that use it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.chat import R1_DISTILL_CHAT_TEMPLATE

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CORPUS = [
    "Start with 7. Add 3, then multiply by 2. What is the result?",
    "<think>\n7 + 3 = 10\n10 * 2 = 20\n</think>\n\nThe answer is \\boxed{20}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The quick brown fox jumps over the lazy dog 0123456789 +-*/=()[]{}",
]


def write_tokenizer(directory: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE whose ids 0..5 are SPECIALS (BOS 0, EOS 1), with the R1-Distill chat
    template, in Hugging Face form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "add_bos_token": False,
              "chat_template": R1_DISTILL_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return directory


def qwen2_dir(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random Qwen2 checkpoint with the toy tokenizer (vocab 320, BOS 0, EOS 1)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).float().save_pretrained(directory, safe_serialization=True)
    return write_tokenizer(directory)


def deepseek_dir(directory: Path, seed: int = 0, experts: int = 4) -> Path:
    """A tiny random DeepseekV3 (MLA, 4 routed experts top-2, one dense layer) with the toy tokenizer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False)
    DeepseekV3ForCausalLM(cfg).float().save_pretrained(directory, safe_serialization=True)
    return write_tokenizer(directory)
