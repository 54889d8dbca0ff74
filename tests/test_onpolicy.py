"""On-policy distillation in `distill train`: the student samples through the engine with its live
weights, the teacher scores its tokens; learning, exact resume after kill -9, a mesh equal to one
device, GKD's lambda, bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from distill.errors import DistillError
from distill.inference import EngineConfig
from distill.serve.app import ServerThread, build_app
from distill.train.loop import run_train
from distill.train.rollouts import is_onpolicy, onpolicy_before, prompt_order

from .helpers import run_cli
from .runs import REPO, run_params, train_config, train_process, wait_for

PROMPTS = {"source": "synthetic", "synthetic": {"n": 64, "seed": 5, "style": "compact",
                                                "min_steps": 2, "max_steps": 2}}


def onpolicy_config(world, teacher: Path, path: Path, onpolicy=None, **sections) -> Path:
    """The tiny Qwen2 student distilled on-policy from `teacher` (a run or HF directory)."""
    section = {"prompts": PROMPTS, "teacher": {"kind": "jax", "model": str(teacher)},
               "group_size": 2, "prompts_per_step": 4, "max_new_tokens": 16,
               "engine": {"slots": 8, "prefill_chunk": 64, "min_window": 64},
               **(onpolicy or {})}
    return train_config(world, path, onpolicy=section, **sections)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedule_and_prompt_stream_depend_on_seed_and_step_only():
    draws = [is_onpolicy(0, s, 0.25) for s in range(400)]
    assert 0.15 < np.mean(draws) < 0.35
    assert all(is_onpolicy(3, s, 1.0) for s in range(10))
    assert not any(is_onpolicy(3, s, 0.0) for s in range(10))
    assert onpolicy_before(0, 400, 0.25) == sum(draws)
    # a pass over the prompts is a permutation; the next pass another one
    first = prompt_order(0, 10, 0, 10)
    assert sorted(first) == list(range(10))
    assert list(prompt_order(0, 10, 10, 10)) != list(first)
    assert list(prompt_order(0, 10, 4, 3)) == list(first[4:7])


def test_onpolicy_steps_pull_the_student_toward_the_teacher(world, toy_qwen2_dir, tmp_path):
    cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "learn.yaml",
                          train={"steps": 12, "log_every": 2},
                          optim={"lr": 1e-2, "warmup_steps": 1})
    result = run_train(cfg, progress=False)
    m = metrics(result.run_dir)
    kl = [r["sampled_reverse_kl"] for r in m]
    assert len(m) == 6 and all(r["rollout_share"] > 0 for r in m)
    assert all(0 < r["completion_tokens"] <= 16 for r in m)
    assert m[-1]["entropy"] >= 0.5 * m[0]["entropy"]
    print("reverse KL on own samples:", [round(x, 3) for x in kl])
    assert kl[-1] < 0.6 * kl[0]  # falls by >= 40%


def test_mesh_of_8_devices_equals_one_device(world, toy_qwen2_dir, tmp_path):
    # 3 on-policy steps (with more, float rounding of the sharded step can flip one of the
    # student's samples, and then the runs part ways legitimately)
    common = dict(train={"steps": 3, "log_every": 1})
    for name, mesh, n in (("one", "data=1,fsdp=1", 1), ("mesh", "data=2,fsdp=4", 8)):
        run_train(onpolicy_config(world, toy_qwen2_dir, tmp_path / f"{name}.yaml",
                                  {"prompts_per_step": 8}, mesh=mesh, **common),
                  progress=False, devices=jax.devices()[:n])
    a, b = (metrics(tmp_path / "students" / n) for n in ("one", "mesh"))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    for x, y in zip(run_params(tmp_path / "students" / "mesh"),
                    run_params(tmp_path / "students" / "one"), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_served_teacher_trains_as_the_in_process_one(world, toy_qwen2_dir, toy_qwen2,
                                                       tmp_path):
    """`distill serve` scoring through vLLM's request (the sampled-token loss, which is all a
    served teacher gives) trains the student as the same teacher in process does."""
    common = dict(train={"steps": 3, "log_every": 1})
    local = onpolicy_config(world, toy_qwen2_dir, tmp_path / "local.yaml",
                            {"loss": "sampled_reverse_kl"}, **common)
    run_train(local, progress=False, devices=jax.devices()[:1])
    app = build_app(*toy_qwen2, "toy", config=EngineConfig(slots=2, max_len=64))
    with ServerThread(app) as base_url:
        teacher = {"kind": "openai", "base_url": f"{base_url}/v1", "model": "toy",
                   "scoring": "vllm", "tokenizer": str(toy_qwen2_dir)}
        served = onpolicy_config(world, toy_qwen2_dir, tmp_path / "served.yaml",
                                 {"loss": "sampled_reverse_kl", "teacher": teacher}, **common)
        run_train(served, progress=False, devices=jax.devices()[:1])
    a, b = (metrics(tmp_path / "students" / n) for n in ("local", "served"))
    np.testing.assert_allclose([r["sampled_reverse_kl"] for r in b],
                               [r["sampled_reverse_kl"] for r in a], rtol=1e-4)
    for x, y in zip(run_params(tmp_path / "students" / "served"),
                    run_params(tmp_path / "students" / "local"), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def _committed(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()
                  and (p / "_CHECKPOINT_METADATA").exists()) if ck.is_dir() else []


def test_lambda_mixes_steps_and_kill_9_then_resume_equals_an_uninterrupted_run(
        world, toy_qwen2_dir, tmp_path):
    common = dict(train={"steps": 8, "checkpoint_every": 2, "log_every": 1})
    ref = onpolicy_config(world, toy_qwen2_dir, tmp_path / "ref.yaml", {"fraction": 0.7},
                          **common)
    proc = train_process(ref)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    # GKD's lambda: trace steps (cross-entropy) and on-policy steps as the seed draws them
    m = metrics(tmp_path / "students" / "ref")
    kinds = ["sampled_reverse_kl" in r for r in m]
    assert kinds == [is_onpolicy(0, s, 0.7) for s in range(8)] and 0 < sum(kinds) < 8
    assert all("ce" in r for r, on in zip(m, kinds, strict=True) if not on)
    cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "run.yaml", {"fraction": 0.7},
                          **common)
    run_dir = tmp_path / "students" / "run"
    proc = train_process(cfg)
    assert wait_for(lambda: any(s >= 4 for s in _committed(run_dir)), timeout=300), (
        proc.stderr.read() if proc.poll() is not None else "no checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _committed(run_dir)[-1] < 8
    proc = train_process(cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for a, b in zip(run_params(run_dir), run_params(tmp_path / "students" / "ref"), strict=True):
        assert np.array_equal(a, b)


def test_bad_onpolicy_config_fails_in_one_line_and_writes_nothing(world, toy_qwen2_dir, tmp_path):
    proc = run_cli(["train", onpolicy_config(world, toy_qwen2_dir, tmp_path / "bad.yaml",
                                             {"fraction": 1.5}), "--quiet"], cwd=REPO)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "onpolicy.fraction" in lines[0], (
        proc.stderr)
    for edit, message in (({"group_size": 0}, "onpolicy.group_size"),
                          ({"teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                                        "model": "m"}}, "onpolicy.teacher.tokenizer")):
        with pytest.raises(DistillError, match=message):
            run_train(onpolicy_config(world, toy_qwen2_dir, tmp_path / "bad.yaml", edit),
                      progress=False)
    assert not (tmp_path / "students" / "bad").exists()


def test_a_teacher_of_another_vocabulary_needs_the_sampled_loss(world, tmp_path):
    from tests import toy

    other = toy.write_tokenizer(tmp_path / "other-tok", vocab_size=300)
    teacher = toy.qwen2_dir(tmp_path / "other-teacher")
    (teacher / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    cfg = onpolicy_config(world, teacher, tmp_path / "cross.yaml", {"loss": "reverse_kl"})
    with pytest.raises(DistillError, match="their tokenizers differ; use sampled_reverse_kl"):
        run_train(cfg, progress=False)


def test_a_served_teacher_that_cannot_score_prompts_is_one_line_before_anything_is_written(
        world, toy_qwen2_dir, tmp_path):
    """A server whose /v1/completions answers without `prompt_logprobs` (an OpenAI-compatible
    server that does not score prompts): exit 2, one line naming the URL, no run directory."""
    import http.server
    import threading

    class NoScores(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server name)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"id": "x", "object": "text_completion", "model": "m", "choices": [
                {"index": 0, "text": "2", "logprobs": None, "finish_reason": "length"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoScores)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "noscore.yaml", {
            "loss": "sampled_reverse_kl", "teacher": {"kind": "openai", "base_url": url,
                                                      "model": "m", "tokenizer": str(toy_qwen2_dir)}})
        proc = run_cli(["train", cfg, "--quiet"], cwd=REPO)
    finally:
        server.shutdown()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and url in lines[0], proc.stderr
    assert "prompt_logprobs" in lines[0]
    assert not (tmp_path / "students" / "noscore").exists()
