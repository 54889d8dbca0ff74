"""`distill bench data`: a smoke test at toy size (the figures' presence and units, no timing)."""

import json
import math

import pytest

from distill.bench.data import main

FIGURES = {"tokens", "documents", "cores", "write_synthetic_s", "tokenizer_per_core_tokens_per_s",
           "limit_tokens_per_s", "build", "build_vs_limit", "second_start", "plan_1m",
           "bytes_per_token"}  # and "step_4x2048" when steps > 0


def numbers(value):
    """Every number in a JSON value."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_bench_data_reports_every_figure(tmp_path, smollm2_gguf):
    out = tmp_path / "bench"
    result = json.loads(main(str(smollm2_gguf), 300_000, out, steps=0))
    assert json.loads((out / "data.json").read_text()) == result
    assert set(result) == FIGURES  # every figure, and no training step at steps=0
    assert all(math.isfinite(x) and x >= 0 for x in numbers(result)), result
    assert result["tokens"] >= 300_000 and result["documents"] > 10
    build, again = result["build"], result["second_start"]
    assert build["tokens"] == again["tokens"] == result["tokens"]
    assert result["limit_tokens_per_s"] > 0 and 0 < result["build_vs_limit"]
    # a ratio of the two (exact equality fails on float rounding, one time in several)
    assert build["tokens_per_s"] == pytest.approx(
        result["build_vs_limit"] * result["limit_tokens_per_s"], rel=1e-12)
    assert again["open_s"] > 0 and build["open_s"] > 0
    # opened, not built again: the cache root holds the plain cache and the top-8 one, no third
    assert len([p for p in (out / "cache").iterdir() if p.is_dir()]) == 2
    assert again["batch_ms"] > 0 and 0 < again["packing"] <= 1
    assert result["plan_1m"]["documents"] == 1_000_000 and result["plan_1m"]["rows"] > 0
    # SmolLM2's 49,152 ids are uint16, the loss mask a byte; 8 teacher entries add 32 bytes a
    # completion token (uint16 id + float16 log-probability)
    assert result["bytes_per_token"]["no_topk"] == 3.0
    assert 3.0 + 30 < result["bytes_per_token"]["topk8"] < 3.0 + 32
