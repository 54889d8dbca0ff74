"""distill: knowledge distillation of large MoE reasoning models into dense Flax students.

    import distill
    model, tokenizer = distill.load_pretrained(path)     # HF dir, GGUF file or preset YAML
    logits = model(input_ids)                             # [B, T] int32 -> [B, T, V] float32
    distill.save_pretrained(model, tokenizer, out_dir)   # Hugging Face format
"""

from distill.errors import DistillError
from distill.pretrained import load_pretrained, save_pretrained

__all__ = ["DistillError", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
