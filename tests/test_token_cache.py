"""The tokenized cache (`distill.data.tokens`): batches identical to tokenising in memory (a
mixture with teacher top-k, both splits, process shares), reuse on a second start, rebuilds that
say which input changed, a build killed with kill -9, and two processes building one cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.data.records import TRACE_SCHEMA
from distill.data.traces import read_traces
from distill.tokenizer import Tokenizer
from distill.train.data import DataConfig, TrainData

from . import toy
from .trace_rows import trace_row, with_teacher, write_traces

REPO = Path(__file__).resolve().parents[1]


def mixture(root: Path, tok) -> list[str]:
    """A dataset with teacher top-k on most traces (some without EOS scored, some plain, one with
    no assistant text) and a plain one."""
    rows = [with_teacher(tok, i, drop_eos=i % 3 == 0) if i % 4 else trace_row(i, 2 + i % 5)
            for i in range(40)]
    rows.append(trace_row(99, 1, reasoning="", answer=""))
    kd = write_traces(root / "kd", rows, shards=3)
    plain = write_traces(root / "plain", [trace_row(100 + i, 1 + i % 7) for i in range(25)],
                         shards=1)
    return [str(kd), str(plain)]


def data_config(sources, **kw) -> DataConfig:
    base = dict(traces=sources, weights=[2.0, 1.0], seq_len=160, batch_size=4, top_k=4,
                heldout_fraction=0.2, cache_block=7)
    return DataConfig(**{**base, **kw})


def assert_same_batches(a: TrainData, b: TrainData, epochs: int = 2) -> None:
    assert a.counts == b.counts and a.fingerprint == b.fingerprint  # a checkpoint resumes either
    for epoch in range(epochs):
        assert a.steps_per_epoch(epoch) == b.steps_per_epoch(epoch)
        for i in range(a.steps_per_epoch(epoch)):
            x, y = a.batch(epoch, i), b.batch(epoch, i)
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), (epoch, i, k)


def test_cached_batches_equal_tokenising_in_memory(tmp_path, tok):
    sources = mixture(tmp_path, tok)
    cfg = data_config(sources)
    for split in ("train", "heldout"):
        for p in range(2):
            shares = dict(process_index=p, process_count=2, split=split)
            cached = TrainData.from_config(cfg, tok, cache_root=tmp_path / "cache", **shares)
            memory = TrainData.from_config(cfg, tok, **shares)  # no cache root: in memory
            assert_same_batches(cached, memory)
    parts = list((tmp_path / "cache").glob("*/parts/d*"))
    assert len(parts) == 6 + 4  # 41 kept traces in blocks of 7, then 25
    # default weights: each dataset's traces in the split (as read_traces counts them)
    sizes = read_traces(sources, split="train", heldout_fraction=0.2).datasets
    unweighted = data_config(sources, weights=None)
    cached = TrainData.from_config(unweighted, tok, cache_root=tmp_path / "cache")
    assert cached.weights == tuple(float(len(d)) for d in sizes)
    assert_same_batches(cached, TrainData.from_config(unweighted, tok))
    train = TrainData.from_config(cfg, tok, cache_root=tmp_path / "cache")
    assert train.counts.with_teacher > 0 and train.counts.dropped_overlong > 0
    lps = train.batch(0, 0)["top_logprobs_btk"]
    assert np.isfinite(lps).any()
    assert np.array_equal(lps, lps.astype(np.float16).astype(np.float32))  # stored as float16
    assert train.docs.doc(0)[0].dtype == np.uint16  # the toy vocabulary's 300 ids


def test_a_second_start_reuses_the_cache_and_a_change_rebuilds_it(tmp_path, tok, capsys):
    sources = mixture(tmp_path, tok)
    root = tmp_path / "cache"
    first = TrainData.from_config(data_config(sources), tok, cache_root=root)
    assert "no cache of these traces yet" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/parts/*/tokens.bin")}
    again = TrainData.from_config(data_config(sources), tok, cache_root=root)
    assert capsys.readouterr().out == ""
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("*/parts/*/tokens.bin")}
    assert again.fingerprint == first.fingerprint

    TrainData.from_config(data_config(sources, top_k=2), tok, cache_root=root)
    assert "the render settings changed (top_k 4 -> 2)" in capsys.readouterr().out
    other = Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / "tok2", vocab_size=330))
    TrainData.from_config(data_config(sources, top_k=0), other, cache_root=root)
    assert "the student tokenizer changed" in capsys.readouterr().out
    shard = Path(sources[1]) / "shard-00000.parquet"
    rows = pq.read_table(shard).to_pylist()
    rows[3]["answer"] = "The answer is \\boxed{0}."
    pq.write_table(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), shard)
    changed = TrainData.from_config(data_config(sources), tok, cache_root=root)
    out = capsys.readouterr().out
    assert f"the traces of {sources[1]} changed (shard-00000.parquet modified)" in out
    assert changed.fingerprint == first.fingerprint  # same trace ids: a checkpoint still resumes
    d = int((first.docs.dataset == 0).sum()) + 3  # row 3 of the second dataset
    assert not np.array_equal(changed.docs.doc(d)[0], first.docs.doc(d)[0])


BUILD = """
import sys
from distill.tokenizer import Tokenizer
from distill.train.data import DataConfig, TrainData
tok = Tokenizer.from_pretrained(sys.argv[1])
cfg = DataConfig.model_validate_json(sys.argv[2])
TrainData.from_config(cfg, tok, int(sys.argv[4]), int(sys.argv[5]), cache_root=sys.argv[3])
"""


def _build(tok_dir: Path, cfg: DataConfig, root: Path, p: int = 0, n: int = 1) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", BUILD, str(tok_dir), cfg.model_dump_json(),
                             str(root), str(p), str(n)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory, tok):
    """2,000 traces in 4 shards and the tokenizer's folder, for builds in other processes."""
    root = tmp_path_factory.mktemp("big")
    tok_dir = toy.write_tokenizer(root / "tok")
    path = write_traces(root / "traces", [trace_row(i, 1 + i % 9) for i in range(2000)], shards=4)
    return tok_dir, data_config([str(path)], weights=None, top_k=0, seq_len=128, cache_block=10)


def test_a_build_killed_with_kill_9_completes_on_the_next_start(tmp_path, big):
    tok_dir, cfg = big
    tok = Tokenizer.from_pretrained(tok_dir)
    root = tmp_path / "cache"
    proc = _build(tok_dir, cfg, root)
    deadline = time.time() + 120
    while len(list(root.glob("*/parts/d*"))) < 20 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [cache_dir] = list(root.iterdir())
    assert not (cache_dir / "complete.json").exists()  # killed mid-build
    kept = {m: m.stat().st_mtime_ns for m in cache_dir.glob("parts/d*/meta.json")}
    assert 20 <= len(kept) < 200
    cached = TrainData.from_config(cfg, tok, cache_root=root)
    assert_same_batches(cached, TrainData.from_config(cfg, tok), epochs=1)
    assert len(list(cache_dir.glob("parts/d*"))) == 200  # 2,000 traces, nothing twice
    assert not list(cache_dir.glob("parts/.tmp-*")) and not (cache_dir / "claims").exists()
    # the parts the killed build finished were kept as they were
    assert all(m.stat().st_mtime_ns == t for m, t in kept.items())
    assert {json.loads(m.read_text())["built_by"]["pid"] for m in kept} == {proc.pid}


def test_two_processes_build_one_cache_together(tmp_path, big):
    tok_dir, cfg = big
    root = tmp_path / "cache"
    procs = [_build(tok_dir, cfg, root, p, 2) for p in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    [cache_dir] = list(root.iterdir())
    built_by = [json.loads(m.read_text())["built_by"] for m in cache_dir.glob("parts/d*/meta.json")]
    assert len(built_by) == 200  # each block once
    assert {b["process"] for b in built_by} == {0, 1}  # by both processes
    tok = Tokenizer.from_pretrained(tok_dir)
    assert_same_batches(TrainData.from_config(cfg, tok, cache_root=root),
                        TrainData.from_config(cfg, tok), epochs=1)
