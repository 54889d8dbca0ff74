"""`distill train` of LoRA / QLoRA students: only the adapters train and are checkpointed, the
checkpoint names its base, exact resume, a mesh equals one device, merged loading, bad input."""

from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import distill
from distill.models import lora
from distill.train.loop import run_train

from . import toy
from .helpers import invoke_cli
from .runs import REPO, free_port, run_params, train_config, train_process, wait_for
from .test_train import _committed, metrics

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Qwen2 checkpoint (the frozen base) and a second one of the same shape."""
    root = tmp_path_factory.mktemp("bases")
    return toy.qwen2_dir(root / "a", seed=0), toy.qwen2_dir(root / "b", seed=1)


def lora_config(world, tmp_path, name, base_dir, **sections):
    student = {"init": str(base_dir), "tokenizer": str(world["tok"]), "lora": LORA,
               **sections.pop("student", {})}
    return train_config(world, tmp_path / f"{name}.yaml", student=student, **sections)


def test_only_adapters_train_and_the_checkpoint_holds_them_with_its_base(world, base, tmp_path):
    cfg = lora_config(world, tmp_path, "run", base[0], train={"steps": 8},
                      optim={"lr": 1e-2, "warmup_steps": 0})
    run_train(cfg, progress=False)
    run_dir = tmp_path / "students" / "run"
    losses = [m["loss"] for m in metrics(run_dir)]
    assert losses[-1] < losses[0]
    # the checkpoint: the adapters (A and B of 7 targets) and their Adam moments, nothing else
    meta = ocp.PyTreeCheckpointer().metadata(run_dir / "checkpoints" / "8" / "state")
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    names = {jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
    assert len(names) == 14 and all("_lora']['lora_" in n for n in names), sorted(names)
    extra = distill.runs.read_extra(run_dir / "checkpoints", 8)
    assert extra["base"]["init"] == str(base[0])

    trained, _ = distill.load_pretrained(run_dir)
    plain, _ = distill.load_pretrained(base[0])
    assert trained.config.lora.rank == 4
    # the frozen base is the base, bit for bit; the adapters moved
    for name, t in lora.TARGETS.items():
        ours = getattr(getattr(trained.blocks, t.module), t.weight)[...]
        assert np.array_equal(ours, getattr(getattr(plain.blocks, t.module), t.weight)[...])
        b = getattr(getattr(trained.blocks, t.module), lora.adapter_attr(name)).lora_b[...]
        assert float(jnp.abs(b).max()) > 0, name
    merged, _ = distill.load_pretrained(run_dir, merge=True)
    assert merged.config.lora is None
    tokens = jnp.asarray([[0, 5, 17, 42, 9, 3]])
    np.testing.assert_allclose(merged(tokens), trained(tokens), atol=2e-5)
    assert not np.allclose(plain(tokens), trained(tokens), atol=1e-4)

    # the same run directory on another base: one line, exit 2, nothing moved aside
    other = lora_config(world, tmp_path, "run", base[1], train={"steps": 12},
                        optim={"lr": 1e-2, "warmup_steps": 0})
    out = invoke_cli(["train", other, "--quiet"])
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "adapters were trained on the base" in out.stderr
    assert _committed(run_dir) == [8]


def test_kill_9_then_resume_equals_an_uninterrupted_run_bitwise_and_two_processes_one(
        world, base, tmp_path):
    common = dict(train={"steps": 12, "checkpoint_every": 3, "log_every": 3})
    ref = train_process(lora_config(world, tmp_path, "ref", base[0], **common))
    # the same run on two processes of one device each (the mesh is the same: fsdp=2)
    port = free_port()
    two = [train_process(lora_config(world, tmp_path, "two", base[0], **common),
                         {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                          "DISTILL_COORDINATOR": f"127.0.0.1:{port}",
                          "DISTILL_NUM_PROCESSES": "2", "DISTILL_PROCESS_ID": str(i)})
           for i in range(2)]
    for p in (ref, *two):
        assert p.wait(timeout=300) == 0, p.stderr.read()
    for a, b in zip(run_params(tmp_path / "students" / "two"),
                    run_params(tmp_path / "students" / "ref"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    cfg = lora_config(world, tmp_path, "run", base[0], **common)
    run_dir = tmp_path / "students" / "run"
    proc = train_process(cfg)
    assert wait_for(lambda: _committed(run_dir)), proc.stderr.read() if proc.poll() else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _committed(run_dir)[-1] < 12
    proc = train_process(cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for a, b in zip(run_params(run_dir), run_params(tmp_path / "students" / "ref"), strict=True):
        assert np.array_equal(a, b)


def test_a_mesh_of_8_devices_and_accumulation_with_remat_equal_one_device(world, base, tmp_path):
    runs = {  # name: (sections, devices)
        "one": (dict(mesh="data=1,fsdp=1,tensor=1"), 1),
        "eight": (dict(mesh="data=2,fsdp=2,tensor=2"), 8),
        "accum": (dict(mesh="fsdp=2", train={"steps": 3, "grad_accum": 2},
                       student={"remat": "full"}), 2),
    }
    for name, (sections, n) in runs.items():
        sections = {**sections, "train": sections.get("train", {"steps": 3})}
        run_train(lora_config(world, tmp_path, name, base[0], **sections), progress=False,
                  devices=jax.devices()[:n])
    losses = {n: np.array([m["loss"] for m in metrics(tmp_path / "students" / n)]) for n in runs}
    one = run_params(tmp_path / "students" / "one")
    for name in ("eight", "accum"):
        np.testing.assert_allclose(losses[name], losses["one"], rtol=1e-5, err_msg=name)
        for a, b in zip(run_params(tmp_path / "students" / name), one, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("fmt", ["nf4"])  # int8's codes: tests/test_lora.py (the same path)
def test_qlora_trains_merges_into_the_unquantised_base_and_exports(world, base, tmp_path, fmt):
    cfg = lora_config(world, tmp_path, fmt, base[0], student={"quantize": fmt},
                      train={"steps": 6}, optim={"lr": 1e-2, "warmup_steps": 0})
    run_train(cfg, progress=False)
    run_dir = tmp_path / "students" / fmt
    losses = [m["loss"] for m in metrics(run_dir)]
    assert losses[-1] < losses[0]
    trained, _ = distill.load_pretrained(run_dir)
    assert trained.config.quantize == fmt
    merged, _ = distill.load_pretrained(run_dir, merge=True)
    plain, _ = distill.load_pretrained(base[0])
    assert merged.config.quantize == "none" and merged.config.lora is None
    for name, t in lora.TARGETS.items():  # W + scale A B on the unquantised W, in float32
        w = getattr(getattr(plain.blocks, t.module), t.weight)[...]
        adapter = getattr(getattr(trained.blocks, t.module), lora.adapter_attr(name))
        expect = w + adapter.delta()
        got = getattr(getattr(merged.blocks, t.module), t.weight)[...]
        np.testing.assert_array_equal(got, expect, err_msg=name)
    if fmt == "nf4":
        _check_exports(run_dir, merged, base[0], tmp_path)


def _check_exports(run_dir, merged, base_dir, tmp_path):
    """`distill export` of the run (merged), and `--adapter`: transformers loads the first, PEFT
    the second on the base; both give the merged model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for args in (["--out", tmp_path / "merged", "--dtype", "float32"],
                 ["--adapter", "--out", tmp_path / "adapter"]):
        out = invoke_cli(["export", run_dir, *args])
        assert out.returncode == 0, out.stderr
    tokens = [[0, 5, 17, 42, 9, 3]]
    ours = np.asarray(merged(jnp.asarray(tokens)))
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        np.testing.assert_allclose(hf(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                         tmp_path / "adapter").eval()
        np.testing.assert_allclose(peft(torch.tensor(tokens)).logits.numpy(), ours, atol=1e-4)


@pytest.mark.parametrize("student, message", [
    ({"lora": {"rank": 0}}, "student.lora.rank"),
    ({"lora": {"targets": ["q", "qkv"]}}, "student.lora.targets"),
    ({"quantize": "nf4"}, "set student.lora too"),
    ({"lora": {"dropout": 0.05}}, "LoRA dropout is not supported yet"),
    ({"init": str(REPO / "configs/teachers/tiny-moe.yaml"), "lora": LORA}, "MoE model is not supported yet"),
], ids=["rank", "target", "quantize-alone", "dropout", "moe"])
def test_bad_lora_input_fails_in_one_line(world, tmp_path, student, message):
    student = {"init": str(REPO / "configs/students/tiny-qwen2.yaml"), "tokenizer": str(world["tok"]),
               **student}
    cfg = train_config(world, tmp_path / "bad.yaml", student=student)
    out = invoke_cli(["train", cfg, "--quiet"])
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert not (tmp_path / "students" / "bad" / "checkpoints").exists()


def test_an_onpolicy_lora_student_samples_with_its_live_adapters_and_loads_anywhere(
        world, base, tmp_path):
    from .test_onpolicy import onpolicy_config

    # SFT with LoRA, then on-policy with new adapters on the SFT run's merged model
    run_train(lora_config(world, tmp_path, "sft", base[0], train={"steps": 2},
                          optim={"lr": 1e-2, "warmup_steps": 0}), progress=False)
    sft = tmp_path / "students" / "sft"
    student = {"init": str(sft), "tokenizer": str(world["tok"]), "lora": LORA}
    cfg = onpolicy_config(world, base[1], tmp_path / "onp.yaml", student=student,
                          onpolicy={"fraction": 1.0}, train={"steps": 2, "log_every": 1},
                          optim={"lr": 1e-2, "warmup_steps": 0})
    result = run_train(cfg, progress=False)
    m = metrics(result.run_dir)
    assert len(m) == 2 and all(r["completion_tokens"] > 0 and r["sampled_reverse_kl"] > 0
                               for r in m)
    trained, _ = distill.load_pretrained(result.run_dir)
    assert float(jnp.abs(trained.blocks.attn.q_lora.lora_b[...]).max()) > 0
    sft_merged, _ = distill.load_pretrained(sft, merge=True)
    assert distill.runs.read_extra(result.run_dir / "checkpoints", 2)["base"]["fingerprint"] == \
        distill.runs.base_fingerprint(sft_merged)
    out = invoke_cli(["sample", result.run_dir, "--prompt", "1+2", "--max-new-tokens", "4",
                      "--raw"])
    assert out.returncode == 0, out.stderr
    assert "loaded the checkpoint of step 2" in out.stderr



def test_a_lora_run_on_a_preset_base_of_another_seed_loads(world, tmp_path):
    cfg = lora_config(world, tmp_path, "seeded", REPO / "configs/students/tiny-qwen2.yaml",
                      train={"steps": 1, "seed": 3})
    run_train(cfg, progress=False)
    model, _ = distill.load_pretrained(tmp_path / "students" / "seeded")  # the base of seed 3
    assert model.config.lora.rank == LORA["rank"]
