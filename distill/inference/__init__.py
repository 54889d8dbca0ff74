"""The inference engine every in-process model samples through (serve, generate, eval, sample,
rollouts, benchmarks): fixed slots, continuous batching, chunked prefill, per-request sampling as
data, bounded compiles, weights swappable without a recompile. See `engine`. Beside it,
`scoring`: a model's log-probabilities on given tokens (teacher scoring)."""

from distill.inference.completion import Completion
from distill.inference.engine import Engine, EngineConfig, EngineError, Request, compiles, stop_ids
from distill.inference.scoring import TokenScores, score_sequences

__all__ = ["Completion", "Engine", "EngineConfig", "EngineError", "Request", "TokenScores",
           "compiles", "score_sequences", "stop_ids"]
