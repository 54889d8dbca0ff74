"""`distill bench`: side-by-side benchmarks against transformers + PyTorch, reported as ratios
(decode, trace generation, training throughput, the MoE layer)."""

from pathlib import Path

from distill.errors import DistillError

DEFAULT_GGUF = Path(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # `make models`


def smollm2_path(gguf_path: str | None) -> Path:
    """The SmolLM2 GGUF to use: the given path, else the one `make models` fetched."""
    gguf = Path(gguf_path) if gguf_path else DEFAULT_GGUF
    if not gguf.is_file():
        raise DistillError(f"{gguf}: SmolLM2 GGUF not found; run `make models` first")
    return gguf
