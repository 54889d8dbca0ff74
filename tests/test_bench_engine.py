"""`distill bench --suite engine` on a tiny random Qwen2 at small sizes: every figure present and
sane (utilisation in (0, 1], continuous batching no worse than static, the seeded tokens the same
both ways, nothing compiled after warmup). No timing targets are judged here."""

import json

import pytest

from distill.bench.engine import Settings, main, table


@pytest.fixture(scope="module")
def report(toy_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "engine.json"
    settings = Settings(requests=12, slots=4, budgets=(4, 24), max_len=128, sweep=20,
                        max_tokens=32, visits=2, prefill_chunk=16, min_window=16)
    result = main(toy_qwen2_dir, out, settings, progress=lambda _: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def test_batching_figures(report):
    b = report["batching"]
    assert b["requests"] == 12 and all(4 <= x <= 24 for x in b["budgets"])
    for side in ("continuous", "static"):
        r = b[side]
        assert r["tokens"] == sum(b["budgets"])  # no EOS ids: every request runs to its budget
        assert 0 < r["utilisation"] <= 1 and r["tokens_per_s"] > 0
        assert r["utilisation"] == pytest.approx(r["tokens"] / r["slot_steps"])
    assert b["same_tokens"]  # a seeded request samples the same tokens whatever runs beside it
    # fewer slot-steps for the same tokens: a freed slot takes the next request at once
    assert b["continuous"]["slot_steps"] < b["static"]["slot_steps"]
    assert b["utilisation_ratio"] > 1
    su = report["sustained"]
    assert su["clients"] == 12 and su["requests"] == 24 and su["tokens"] > 0
    assert 0 < su["utilisation"] <= 1 and 0 < su["utilisation_steady"] <= 1
    # a request computes whole decode chunks: no run beats that bound
    assert b["static"]["utilisation"] < b["continuous"]["utilisation"] <= b["chunk_bound"] <= 1


def test_compiles_and_step_figures(report):
    assert report["warmup"]["programs"] == report["programs"] > 0
    assert report["compiles_after_warmup"] == 0
    sw = report["sweep"]
    assert sw["compiles"] == 0 and sw["temperatures"] == [0.05, 1.0, 20] and sw["seeds"] == 10
    assert sw["n"] == [1, 2, 3, 4] and sw["max_tokens"] == [1, 32]
    assert sw["longest_sequence"] == sw["max_len"] == 128 and sw["past_limit_refused"] == 2
    assert sw["tokens"] > 0
    w = report["set_weights"]
    assert w["compiles"] == w["compiles_decoding_after"] == 0 and len(w["seconds"]) == 3
    st = report["step"]
    assert st["greedy_step_s"] > 0 and st["sampled_over_greedy"] > 0
    assert [t["concurrency"] for t in report["ttft"]] == [1, 4]
    for t in report["ttft"]:
        assert 0 < t["ttft_p50_s"] <= t["ttft_max_s"] and t["prefill_chunk_s"] > 0
    lines = table(report)
    for figure in ("utilisation, 12 requests at once", "12 clients sustained", "sampled / greedy", "TTFT at concurrency 4",
                   "compiles after warmup (sweep)", "set_weights / decode step"):
        assert figure in lines, figure
