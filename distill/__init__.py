"""distill: knowledge distillation of large MoE reasoning models into dense Flax students.

    import distill
    model, tokenizer = distill.load_pretrained(path)     # HF dir, GGUF file or preset YAML
    logits = model(input_ids)                             # [B, T] int32 -> [B, T, V] float32
    distill.save_pretrained(model, tokenizer, out_dir)   # Hugging Face format

`load_pretrained` and `save_pretrained` are imported on first use, so `import distill` (and the
command line's `--help`) does not import JAX.
"""

from distill.errors import DistillError

__all__ = ["DistillError", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load_pretrained", "save_pretrained"):
        from distill import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
