"""`distill generate` end to end: in-process and HTTP teachers, crash safety, resume, bad input."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml

import distill
from distill.data import store as data_store
from distill.data.records import TRACE_SCHEMA
from distill.tokenizer import Tokenizer
from distill.traces.generate import run_generate

from .helpers import assert_user_error, invoke_cli, shared_compile_cache, start_cli
from .runs import generate_config

REPO = Path(__file__).resolve().parents[1]


def records(run_dir: Path) -> list[dict]:
    return data_store.read_table(run_dir).to_pylist()


def check_complete(run_dir: Path, prompts: int, n: int) -> list[dict]:
    rows = records(run_dir)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == prompts * n
    assert {(r["prompt_id"], r["sample_index"]) for r in rows} == {
        (p, k) for p in {r["prompt_id"] for r in rows} for k in range(n)}
    manifest = data_store.read_manifest(run_dir)
    assert manifest["complete"] and manifest["totals"]["records"] == prompts * n
    return rows


def test_in_process_teacher_writes_a_dataset_that_datasets_loads(tmp_path, teacher_dir):
    cfg = generate_config(tmp_path / "run.yaml", tmp_path / "out",
                       {"kind": "jax", "model": str(teacher_dir), "engine": {"slots": 4}})
    summary = run_generate(cfg, progress=False)
    assert (summary.prompts, summary.samples, summary.records) == (10, 20, 20)
    rows = check_complete(summary.run_dir, 10, 2)
    tokenizer = Tokenizer.from_pretrained(teacher_dir)
    table = tokenizer.token_bytes()
    ds = datasets.load_dataset("parquet", data_dir=str(summary.run_dir / "data"), split="train")
    assert len(ds) == 20 and set(ds.column_names) == set(TRACE_SCHEMA.names)
    for r in rows:
        assert r["id"] == f"{r['prompt_id']}#{r['sample_index']}"
        assert r["prompt"].endswith("Put the answer in \\boxed{}.") and r["reference"].isdigit()
        assert r["teacher"].startswith("jax:") and r["sampling"]["seed"] == 7
        assert r["finish_reason"] in ("stop", "length")
        assert 0 <= r["completion_tokens"] <= 24 and r["prompt_tokens"] > 10
        if r["completion_tokens"] == 0:  # the random toy teacher at temperature 1 can sample
            assert r["finish_reason"] == "stop" and r["completion"] == ""  # its EOS first
        # top-3 log-probabilities for every completion token, best first
        assert len(r["top_ids"]) == r["completion_tokens"]
        assert all(len(t) == 3 and t[0] >= t[1] >= t[2] for t in r["top_logprobs"])
        # the bytes of the sampled tokens spell the completion; each entry's bytes are its id's
        assert b"".join(r["token_bytes"]).decode(errors="replace") == r["completion"]
        assert [[table[i] for i in row] for row in r["top_ids"]] == r["top_bytes"]
    manifest = data_store.read_manifest(summary.run_dir)
    assert manifest["teacher"]["kind"] == "jax" and manifest["config"]["sampling"]["n"] == 2
    assert manifest["tokenizer"] == {"source": str(teacher_dir), "vocab_size": len(tokenizer),
                                     "vocabulary": tokenizer.vocabulary_fingerprint()}
    assert "datasets.load_dataset" in (summary.run_dir / "README.md").read_text()

    # rerunning the finished run regenerates nothing; a changed field is named
    again = run_generate(cfg, progress=False)
    assert again.resumed_shards == 5 and records(summary.run_dir) == rows
    from distill.errors import DistillError

    with pytest.raises(DistillError, match=r"sampling\.temperature"):
        run_generate(cfg, ["sampling.temperature=0.5"], progress=False)


def _cli(cfg: Path, env=None) -> subprocess.Popen:
    """`distill generate CFG` in a process of its own (killed, or its real stderr read)."""
    return start_cli(["generate", cfg, "--quiet"], cwd=REPO,
                     env={"JAX_PLATFORMS": "cpu", **shared_compile_cache(), **(env or {})})


def test_kill_9_at_three_points_then_resume_equals_an_uninterrupted_run(tmp_path, teacher_dir):
    teacher = {"kind": "jax", "model": str(teacher_dir), "engine": {"slots": 4}}
    # 20 shards of one prompt: the engine writes a shard faster than the kills come
    more = {"prompts": {"synthetic": {"n": 20, "seed": 3}}, "output": {"prompts_per_shard": 1}}
    reference = run_generate(generate_config(tmp_path / "ref.yaml", tmp_path / "ref", teacher,
                                             **more), progress=False)
    cfg = generate_config(tmp_path / "run.yaml", tmp_path / "out", teacher, **more)
    run_dir = tmp_path / "out" / "run"
    rng = random.Random(0)
    stored = []
    for _ in range(3):
        proc = _cli(cfg)
        before = len(data_store.read_manifest(run_dir)["shards"]) if (run_dir / "manifest.json").exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # until it stores a new shard
            if (run_dir / "manifest.json").exists() and len(
                    data_store.read_manifest(run_dir)["shards"]) > before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # then at a random point in the next shard
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stored.append(len(data_store.read_manifest(run_dir)["shards"]))
        data_store.read_table(run_dir)  # every listed shard's checksum is valid after each kill
    assert stored[-1] < 20, "the run finished before the third kill; the test proves nothing"
    proc = _cli(cfg)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rows = check_complete(run_dir, 20, 2)
    assert rows == records(reference.run_dir)


def test_engine_slot_count_and_resume_do_not_change_the_records(tmp_path, teacher_dir):
    """Each prompt samples from its own seed: 2 slots or 5, every prompt in one shard or two per
    shard, the same records (what lets a resumed run, or one on another machine, match)."""
    runs = [run_generate(generate_config(tmp_path / f"{name}.yaml", tmp_path / name,
                                         {"kind": "jax", "model": str(teacher_dir),
                                          "engine": {"slots": slots}},
                                         output={"prompts_per_shard": pps}), progress=False)
            for name, slots, pps in [("two", 2, 2), ("five", 5, 10)]]
    two, five = (check_complete(r.run_dir, 10, 2) for r in runs)
    assert len({r["completion"] for r in two}) > 10  # sampled, not one text
    # every field the same; the stored log-probabilities to float32 rounding (a matmul over 2
    # rows or 5 may sum in another order)
    assert [{**r, "top_logprobs": None} for r in two] == [{**r, "top_logprobs": None} for r in five]
    for a, b in zip(two, five, strict=True):
        np.testing.assert_allclose(a["top_logprobs"], b["top_logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("teacher, sampling", [
    ({"engine": {"max_len": 64}}, {}),
    ({}, {"max_new_tokens": 4000}),  # past the toy teacher's context of 2,048 tokens
], ids=["engine-max-len", "model-context"])
def test_a_prompt_past_the_engine_limit_is_one_line(tmp_path, teacher_dir, teacher, sampling):
    cfg = generate_config(tmp_path / "c.yaml", tmp_path / "out",
                          {"kind": "jax", "model": str(teacher_dir), **teacher}, sampling=sampling)
    line = assert_user_error(invoke_cli(["generate", cfg, "--quiet"], cwd=REPO),
                             "prompt arith-3-0:", "past the engine's limit")
    assert ("of 64 tokens" if teacher else "of 2048 tokens") in line
    assert not data_store.read_manifest(tmp_path / "out" / "c")["complete"]


@pytest.mark.parametrize("content, columns, expected", [
    ('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": \n', {}, "bad.jsonl:2"),
    ('{"prompt": "1+1?", "answer": "2"}\n', {"prompt": "question"}, "question"),
    ("", {}, "bad.jsonl"),
], ids=["malformed-line", "missing-column", "empty-file"])
def test_bad_prompts_fail_in_one_line_and_leave_nothing(tmp_path, teacher_dir, content, columns,
                                                        expected):
    (tmp_path / "bad.jsonl").write_text(content)
    cfg = generate_config(tmp_path / "c.yaml", tmp_path / "out",
                       {"kind": "jax", "model": str(teacher_dir)})
    data = yaml.safe_load(cfg.read_text())
    data["prompts"] = {"source": str(tmp_path / "bad.jsonl"), "columns": columns}
    cfg.write_text(yaml.safe_dump(data))
    assert_user_error(invoke_cli(["generate", cfg, "--quiet"], cwd=REPO), expected)
    assert not (tmp_path / "out" / "c").exists()


@pytest.fixture(scope="module")
def server(teacher_dir):
    """`distill serve` over the toy teacher on 127.0.0.1: 30% of requests fail (429 with
    Retry-After, 500, a hang past the client's timeout, a dropped connection); key required."""
    from distill.serve.app import ServerThread, build_app
    from tests.faults import FaultConfig, with_faults

    model, tok = distill.load_pretrained(teacher_dir)
    app = with_faults(build_app(model, tok, "toy-r1", api_key="sk-test-123"),
                      FaultConfig(rate=0.3, seed=1, retry_after_s=0))
    with ServerThread(app) as url:
        yield url, app


def http_teacher(url: str, **kw) -> dict:
    return {"kind": "openai", "base_url": f"{url}/v1", "model": "toy-r1",
            "api_key_env": "DISTILL_TEST_KEY", "timeout_s": 10.0, "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2, "max_retries": 20, "concurrency": 4, **kw}


def test_http_teacher_against_distill_serve_survives_faults(tmp_path, server, monkeypatch):
    url, app = server
    monkeypatch.setenv("DISTILL_TEST_KEY", "sk-test-123")
    cfg = generate_config(tmp_path / "http.yaml", tmp_path / "out", http_teacher(url),
                       sampling={"logprobs": 0})
    t0 = time.perf_counter()
    summary = run_generate(cfg, progress=False)
    seconds = time.perf_counter() - t0
    rows = check_complete(summary.run_dir, 10, 2)
    print(f"HTTP backend: {len(rows) / seconds:.1f} completed requests/s with 30% faults")
    assert set(app.state.faults) == {"429", "500", "hang", "drop"}
    ds = datasets.load_dataset("parquet", data_dir=str(summary.run_dir / "data"), split="train")
    assert len(ds) == 20 and set(ds.column_names) == set(TRACE_SCHEMA.names)
    assert all(r["teacher"] == "openai:toy-r1" for r in rows)
    text = json.dumps(data_store.read_manifest(summary.run_dir)) + (summary.run_dir / "README.md").read_text()
    assert "sk-test-123" not in text and "DISTILL_TEST_KEY" not in text


def test_http_errors_fail_in_one_line(tmp_path, server):
    url, _ = server
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    free.close()
    cases = {"wrong-key": (http_teacher(url), "sk-wrong", "HTTP 401"),
             "unreachable": (http_teacher(dead, max_retries=2), "sk-test-123", "cannot reach")}
    for name, (teacher, key, expected) in cases.items():
        cfg = generate_config(tmp_path / f"{name}.yaml", tmp_path / "out", teacher)
        proc = _cli(cfg, env={"DISTILL_TEST_KEY": key})
        _, err = proc.communicate(timeout=120)
        # retries are logged as they happen; the failure itself is one line
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], err
        assert "Traceback" not in err and "sk-" not in err
        assert not data_store.read_manifest(tmp_path / "out" / name)["complete"]


def test_example_run_configs_validate():
    from distill.config import load_config
    from distill.traces.generate import GenerateConfig

    for path in sorted((REPO / "configs" / "runs").glob("r1-*-math.yaml")):
        cfg = load_config(GenerateConfig, path)
        assert cfg.sampling.temperature == 0.6 and cfg.sampling.top_p == 0.95


def test_record_schema_is_documented():
    readme = (REPO / "teacher_traces" / "README.md").read_text()
    for name in TRACE_SCHEMA.names:
        assert f"`{name}`" in readme, name
    assert isinstance(TRACE_SCHEMA, pa.Schema)
    json.dumps(TRACE_SCHEMA.names)
