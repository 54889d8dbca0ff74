"""`distill bench soak`'s load generator, briefly, against `distill serve` over a toy model."""

from __future__ import annotations

import math

from distill.bench.soak import run_soak, soak_table
from tests import toy


def test_soak_load_generator_counts_requests_departures_and_server_memory(tmp_path):
    lines = []
    s = run_soak(toy.qwen2_dir(tmp_path / "toy"), seconds=6, concurrency=8, max_tokens=16,
                 warmup_s=2, disconnect_every=2, rss_every_s=0.5, echo=lines.append)
    assert s["requests_failed"] == 0, s["errors"]
    # how many requests fit in the time depends on the machine; how they are counted does not:
    # each of the 8 clients sends at least one, and the requests numbered 4, 8, ... (streaming,
    # every disconnect_every-th) hang up after their first text
    sent = s["requests_ok"] + s["disconnected"]
    assert sent >= 8 and s["requests_ok"] > 0 and 0 < s["disconnected"] <= sent // 4, s
    assert 0 < s["p50_s"] <= s["p99_s"] and s["completion_tokens_per_s"] > 0
    # the server's memory is reported, not judged: its size depends on the machine's libraries
    rss = [s["rss_start_mb"], s["rss_after_warmup_mb"], s["rss_end_mb"],
           s["rss_max_after_warmup_mb"]]
    assert all(math.isfinite(x) and x > 0 for x in rss) and max(rss[1:3]) <= rss[3], rss
    assert "| requests ok | failed |" in soak_table(s) and lines[0].startswith("soak: 8 clients")
