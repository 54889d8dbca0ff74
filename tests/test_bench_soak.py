"""`distill bench soak`'s load generator, briefly, against `distill serve` over a toy model, and
its standalone baseline (the engine in process on the same requests)."""

from __future__ import annotations

import math

from distill.bench.soak import Asks, SoakConfig, run_soak, soak_table
from tests import toy


def test_soak_load_generator_counts_requests_departures_and_server_memory(tmp_path):
    lines = []
    cfg = SoakConfig(seconds=6, concurrency=8, max_tokens=16, warmup_s=2, disconnect_every=2,
                     rss_every_s=0.5, slots=4, max_len=128, warmup=False, baseline_s=2)
    s = run_soak(toy.qwen2_dir(tmp_path / "toy"), cfg, echo=lines.append)
    assert s["requests_failed"] == 0, s["errors"]
    # how many requests fit in the time depends on the machine; how they are counted does not:
    # each of the 8 clients sends at least one, and the requests numbered 4, 8, ... (streaming,
    # every disconnect_every-th) hang up after their first text
    sent = s["requests_ok"] + s["disconnected"]
    assert sent >= 8 and s["requests_ok"] > 0 and 0 < s["disconnected"] <= sent // 4, s
    assert 0 < s["p50_s"] <= s["p99_s"] and s["completion_tokens_per_s"] > 0
    # TTFT is over the streaming requests (those that hang up too), latency over the completed
    # ones: their tails are of different populations, only the TTFT median sits under p99
    assert 0 < s["ttft_p50_s"] <= s["ttft_p99_s"] and s["ttft_p50_s"] <= s["p99_s"]
    # the standalone engine ran the same kind of load first, in process
    assert s["standalone_requests"] >= 8 and s["standalone_tokens_per_s"] > 0
    assert 0 < s["standalone_utilisation"] <= 1
    assert s["ratio_to_standalone"] == s["completion_tokens_per_s"] / s["standalone_tokens_per_s"]
    # the server's memory is reported, not judged: its size depends on the machine's libraries
    rss = [s["rss_start_mb"], s["rss_after_warmup_mb"], s["rss_end_mb"],
           s["rss_max_after_warmup_mb"]]
    assert all(math.isfinite(x) and x > 0 for x in rss) and max(rss[1:3]) <= rss[3], rss
    assert "| requests ok | failed |" in soak_table(s)
    assert any(line.startswith("soak: 8 clients") for line in lines)
    assert any(line.startswith("standalone: ") for line in lines)


def test_each_client_keeps_its_own_sampling_settings():
    asks = Asks(SoakConfig(concurrency=4, max_tokens=64, disconnect_every=3))
    got = [asks.next(c) for _ in range(3) for c in range(4)]
    for c in range(4):
        mine = {(a.temperature, a.top_p) for a in got[c::4]}
        assert len(mine) == 1
    assert len({(a.temperature, a.top_p) for a in got}) == 4  # and they differ between clients
    assert all(0.1 <= a.temperature <= 1.0 and 0.8 <= a.top_p <= 1.0 for a in got)
    assert all(16 <= a.max_tokens <= 64 for a in got) and len({a.i for a in got}) == 12
    body, params = got[1].body(), got[1].params()
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        params.temperature, params.top_p, params.max_new_tokens, params.seed)
    assert body["stream"] and [a.leave for a in got if a.stream] == [False, False, True, False,
                                                                     False, True]
