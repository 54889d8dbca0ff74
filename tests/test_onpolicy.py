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
    assert all(r["entropy"] > 0 for r in m)
    print("reverse KL on own samples:", [round(x, 3) for x in kl])
    assert kl[-1] < 0.6 * kl[0]  # falls by >= 40%


def test_lambda_mixes_trace_steps_and_onpolicy_steps(world, toy_qwen2_dir, tmp_path):
    cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "mix.yaml", {"fraction": 0.5},
                          train={"steps": 6, "log_every": 1})
    m = metrics(run_train(cfg, progress=False).run_dir)
    kinds = ["sampled_reverse_kl" in r for r in m]
    assert kinds == [is_onpolicy(0, s, 0.5) for s in range(6)] and 0 < sum(kinds) < 6
    assert all("ce" in r for r, on in zip(m, kinds, strict=True) if not on)


def test_mesh_of_8_devices_equals_one_device(world, toy_qwen2_dir, tmp_path):
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


def _committed(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()
                  and (p / "_CHECKPOINT_METADATA").exists()) if ck.is_dir() else []


def test_kill_9_during_an_onpolicy_run_then_resume_equals_an_uninterrupted_run(
        world, toy_qwen2_dir, tmp_path):
    common = dict(train={"steps": 10, "checkpoint_every": 2, "log_every": 2})
    ref = onpolicy_config(world, toy_qwen2_dir, tmp_path / "ref.yaml", {"fraction": 0.7},
                          **common)
    proc = train_process(ref)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "run.yaml", {"fraction": 0.7},
                          **common)
    run_dir = tmp_path / "students" / "run"
    proc = train_process(cfg)
    assert wait_for(lambda: any(s >= 4 for s in _committed(run_dir)), timeout=300), (
        proc.stderr.read() if proc.poll() is not None else "no checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _committed(run_dir)[-1] < 10
    proc = train_process(cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for a, b in zip(run_params(run_dir), run_params(tmp_path / "students" / "ref"), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("edit, message", [
    ({"fraction": 1.5}, "onpolicy.fraction"),
    ({"group_size": 0}, "onpolicy.group_size"),
    ({"loss": "reverse_kl", "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9",
                                        "model": "m"}}, "onpolicy.teacher.tokenizer"),
], ids=["lambda", "group", "served-without-tokenizer"])
def test_bad_onpolicy_config_fails_in_one_line_and_writes_nothing(world, toy_qwen2_dir, tmp_path,
                                                                  edit, message):
    cfg = onpolicy_config(world, toy_qwen2_dir, tmp_path / "bad.yaml", edit)
    proc = run_cli(["train", cfg, "--quiet"], cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "students" / "bad").exists()


def test_a_teacher_of_another_vocabulary_needs_the_sampled_loss(world, tmp_path):
    from tests import toy

    other = toy.write_tokenizer(tmp_path / "other-tok", vocab_size=300)
    teacher = toy.qwen2_dir(tmp_path / "other-teacher")
    (teacher / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    cfg = onpolicy_config(world, teacher, tmp_path / "cross.yaml", {"loss": "reverse_kl"})
    with pytest.raises(DistillError, match="their tokenizers differ; use sampled_reverse_kl"):
        run_train(cfg, progress=False)
