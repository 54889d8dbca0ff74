"""The trace shard store: atomic shards, manifest with checksums, resume state, config changes."""

from __future__ import annotations

import json

import datasets
import pytest

from distill.data import store as data_store
from distill.data.records import TRACE_SCHEMA, record_id
from distill.errors import DistillError
from distill.traces import store as st


def _row(pid: str, k: int, correct=True) -> dict:
    return {"id": record_id(pid, k), "prompt_id": pid, "sample_index": k, "prompt": f"q {pid}",
            "messages": None, "reasoning": "2 + 2 = 4", "answer": "\\boxed{4}",
            "completion": "2 + 2 = 4\n</think>\n\n\\boxed{4}", "reference": "4", "predicted": "4",
            "correct": correct, "finish_reason": "stop", "prompt_tokens": 5,
            "completion_tokens": 9, "teacher": "jax:toy",
            "sampling": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64, "seed": 0},
            "meta": None, "top_ids": [[1, 2]] * 9 if k == 0 else None,
            "top_logprobs": [[-0.1, -2.5]] * 9 if k == 0 else None}


STATS = {"prompts": 2, "samples": 4, "rejected": {"wrong": 1}, "prompt_tokens": 20,
         "completion_tokens": 36}
CONFIG = {"sampling": {"temperature": 0.6, "n": 2}, "prompts": {"source": "synthetic"}}


def test_shards_load_with_datasets_and_our_reader(tmp_path):
    run = tmp_path / "run"
    s = st.TraceStore.open(run, CONFIG)
    s.add_shard(0, [_row("a", 0), _row("a", 1), _row("b", 0)], STATS)
    s.add_shard(1, [], {**STATS, "rejected": {"truncated": 4}})  # all rejected: no file
    s.add_shard(2, [_row("c", 1, correct=False)], STATS)
    totals = s.finish("card")
    assert totals["records"] == 4 and totals["rejected"] == {"truncated": 4, "wrong": 2}
    assert totals["prompts"] == 6 and totals["completion_tokens"] == 108

    ds = datasets.load_dataset("parquet", data_dir=str(run / "data"), split="train")
    assert sorted(ds["id"]) == ["a#0", "a#1", "b#0", "c#1"]
    assert ds.features["top_logprobs"] is not None
    ours = data_store.read_table(run)
    assert ours.schema.equals(TRACE_SCHEMA)
    assert ours.column("id").to_pylist() == ["a#0", "a#1", "b#0", "c#1"]
    assert ours.column("top_ids").to_pylist()[0] == [[1, 2]] * 9
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] and [x["records"] for x in manifest["shards"]] == [3, 0, 1]
    assert (run / "README.md").read_text() == "card"


def test_tampered_or_missing_shard_is_detected(tmp_path):
    run = tmp_path / "run"
    s = st.TraceStore.open(run, CONFIG)
    s.add_shard(0, [_row("a", 0)], STATS)
    path = run / "data" / st.shard_name(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DistillError, match="checksum mismatch"):
        list(data_store.iter_records(run))
    path.unlink()
    with pytest.raises(DistillError, match="missing"):
        data_store.read_table(run)


def test_resume_keeps_listed_shards_and_drops_unlisted_files(tmp_path):
    run = tmp_path / "run"
    s = st.TraceStore.open(run, CONFIG)
    s.add_shard(0, [_row("a", 0)], STATS)
    # a crash after a shard file landed but before the manifest listed it, and a temp file
    (run / "data" / st.shard_name(1)).write_bytes(b"PAR1 half")
    (run / "data" / ".shard-00002.parquet.tmp").write_bytes(b"partial")
    again = st.TraceStore.open(run, CONFIG)
    assert again.done() == {0}
    assert sorted(p.name for p in (run / "data").iterdir()) == [st.shard_name(0)]
    assert not json.loads((run / "manifest.json").read_text())["complete"]


def test_changed_config_names_the_fields_and_overwrite_starts_over(tmp_path):
    run = tmp_path / "run"
    st.TraceStore.open(run, CONFIG).add_shard(0, [_row("a", 0)], STATS)
    changed = {**CONFIG, "sampling": {"temperature": 0.7, "n": 2}}
    with pytest.raises(DistillError, match=r"sampling\.temperature \(0\.6 -> 0\.7\)"):
        st.TraceStore.open(run, changed)
    fresh = st.TraceStore.open(run, changed, overwrite=True)
    assert fresh.done() == set() and list((run / "data").iterdir()) == []


def test_not_a_run_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(DistillError, match="no manifest.json"):
        st.TraceStore.open(tmp_path / "x", CONFIG)
    with pytest.raises(DistillError, match="not a trace directory"):
        data_store.read_manifest(tmp_path / "nothing")
