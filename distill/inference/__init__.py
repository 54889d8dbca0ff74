"""The inference engine every in-process model samples through (serve, generate, eval, sample,
rollouts, benchmarks): fixed slots, continuous batching, chunked prefill, per-request sampling as
data, bounded compiles, weights swappable without a recompile. See `engine`."""

from distill.inference.completion import Completion
from distill.inference.engine import Engine, EngineConfig, EngineError, Request, compiles, stop_ids

__all__ = ["Completion", "Engine", "EngineConfig", "EngineError", "Request", "compiles", "stop_ids"]
