"""`distill plan`: each student preset at 32k tokens fits some mesh of <= 64 devices of 80 GB;
Llama-3.3-70B does not fit 8; at 64k-128k tokens a row the 7B and 32B fit 64 devices with context
parallelism and not without; nothing is allocated (the step is only compiled)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import assert_user_error, invoke_cli, run_cli

REPO = Path(__file__).resolve().parents[1]

# preset -> a mesh (<= 64 devices) that holds its training step at 32768 tokens a row
MESHES = {
    "qwen2.5-math-1.5b": "data=1,fsdp=8,tensor=1",
    "qwen2.5-math-7b": "data=1,fsdp=8,tensor=2",
    "llama-3.1-8b": "data=1,fsdp=8,tensor=2",
    "qwen2.5-14b": "data=1,fsdp=16,tensor=2",
    "qwen2.5-32b": "data=1,fsdp=16,tensor=4",
    "llama-3.3-70b-instruct": "data=1,fsdp=16,tensor=4",
}


def plan(*args: str) -> subprocess.CompletedProcess:
    # a process of its own, without our XLA_FLAGS: it starts as many fake devices as the mesh needs
    return run_cli(["plan", *args], cwd=REPO, env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": None},
                   timeout=600)


def total(stdout: str, column: int) -> float:
    row = next(line for line in stdout.splitlines() if line.startswith("| total per device"))
    return float(re.findall(r"([0-9.]+) GiB", row)[column])


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_every_student_preset_fits_a_mesh_at_32k(preset):
    proc = plan(f"configs/students/{preset}.yaml", "--mesh", MESHES[preset], "--seq-len", "32768",
                "--set", "model.remat=full", "--set", "model.dtype=bfloat16",
                "--set", "model.max_position_embeddings=131072")  # as the R1-Distill students
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FITS" in proc.stdout and "DOES NOT FIT" not in proc.stdout
    print(proc.stdout)
    # both counts are printed; the compiler's and the analytic one agree within a factor of 2
    analytic, compiler = total(proc.stdout, 0), total(proc.stdout, 1)
    assert 0.5 < compiler / analytic < 2.0, proc.stdout


# (preset, tokens a row, mesh without context parallelism, mesh with it): 64 devices each, the
# preset's own remat ("none"), bfloat16 compute
LONG_ROWS = [("qwen2.5-math-7b", 131072, "fsdp=16,tensor=4", "context=16,tensor=4"),
             ("qwen2.5-32b", 65536, "fsdp=8,tensor=8", "context=8,tensor=8")]


@pytest.mark.parametrize("preset,tokens,plain,context", LONG_ROWS)
def test_long_rows_fit_with_context_parallelism_and_not_without(preset, tokens, plain, context):
    common = ("--seq-len", str(tokens), "--set", "model.dtype=bfloat16",
              "--set", "model.max_position_embeddings=131072")
    without = plan(f"configs/students/{preset}.yaml", "--mesh", plain, *common)
    assert without.returncode == 1 and "DOES NOT FIT" in without.stdout, without.stdout
    assert "context=N" in without.stdout  # the verdict names context parallelism as a way out
    with_cp = plan(f"configs/students/{preset}.yaml", "--mesh", context, *common)
    assert with_cp.returncode == 0 and "FITS" in with_cp.stdout, with_cp.stdout + with_cp.stderr
    assert "context=16" in with_cp.stdout or "context=8" in with_cp.stdout  # the mesh line
    print(without.stdout, with_cp.stdout)
    assert total(with_cp.stdout, 1) < 0.2 * total(without.stdout, 1)


def test_70b_does_not_fit_eight_devices():
    proc = plan("configs/students/llama-3.3-70b-instruct.yaml", "--mesh", "data=1,fsdp=8,tensor=1",
                "--seq-len", "32768", "--set", "model.remat=full")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DOES NOT FIT" in proc.stdout
    assert total(proc.stdout, 0) > 80  # parameters, AdamW moments and gradients alone
    # the verdict names the largest part: 70B float32 AdamW moments over 8 devices, 2 x 35 GB
    [why] = [line for line in proc.stdout.splitlines() if line.startswith("largest part")]
    assert "optimizer state" in why and "more devices" in why, proc.stdout


def test_plan_refuses_what_train_refuses_in_one_line():
    """The R1 recipe with a 70B student at --batch 16: grad_accum 4 leaves 4 rows a micro-batch
    for 16 batch shards, which `distill train` refuses, so plan does too (exit 2, before any
    compilation); with grad_accum 1 the same plan goes ahead."""
    args = ("configs/runs/r1-distill-qwen-7b.yaml", "--mesh", "data=1,fsdp=16,tensor=4",
            "--batch", "16", "--set", "student.init=configs/students/llama-3.3-70b-instruct.yaml")
    line = assert_user_error(plan(*args))
    assert line == ("error: configs/runs/r1-distill-qwen-7b.yaml: data.batch_size 16 / "
                    "train.grad_accum 4 = 4 rows per micro-batch, which the mesh's data x fsdp = "
                    "16 batch shards do not divide (set train.grad_accum to 1)")
    proc = plan(*args, "--set", "train.grad_accum=1", "--seq-len", "4096")
    assert proc.returncode == 0 and "FITS" in proc.stdout, proc.stdout + proc.stderr
    # and a row longer than the student's positions is refused as train refuses it
    proc = plan("configs/students/qwen2.5-math-1.5b.yaml", "--mesh", "fsdp=8", "--seq-len", "8192")
    assert_user_error(proc, "max_position_embeddings 4096")


def test_the_recipe_plans_and_generate_mode_plans_the_teacher():
    proc = plan("configs/runs/r1-distill-qwen-7b.yaml", "--mesh", "data=1,fsdp=8,tensor=1")
    assert proc.returncode == 0 and "FITS" in proc.stdout, proc.stdout + proc.stderr
    proc = plan("configs/teachers/deepseek-r1.yaml", "--mesh", "data=1,fsdp=1,tensor=8,expert=8",
                "--mode", "generate", "--seq-len", "4096", "--batch", "8",
                "--device-memory", "141GB")
    assert "671.03B parameters" in proc.stdout, proc.stdout + proc.stderr


def test_bad_mesh_is_one_line():
    proc = invoke_cli(["plan", "configs/students/qwen2.5-math-1.5b.yaml", "--mesh",
                       "data=1,fsdp=0"], cwd=REPO)
    assert assert_user_error(proc).startswith("error: mesh")


# LoRA / QLoRA students: the shipped 7B LoRA recipe with a tiny base (in process, one device)
LORA_RUN = "configs/runs/r1-lora-qwen-7b.yaml"
TINY_LORA = ("student.init=configs/students/tiny-qwen2.yaml", "student.lora.rank=4",
             "student.config_overrides={}")


@pytest.fixture(scope="module")
def lora_plans():
    from distill.plan import run_plan

    def one(*overrides):
        return run_plan(REPO / LORA_RUN, "data=1,fsdp=1,tensor=1", seq_len=64, batch=2,
                        overrides=[*TINY_LORA, *overrides])

    return {"full": one("student.lora=null", "student.param_dtype=float32"), "lora": one(),
            "qlora": one("student.quantize=nf4")}


def _adapter_elements(cfg_path: str, rank: int) -> int:
    """sum over targets of R * (in + out) * L, from the model's shapes."""
    from distill.models.families import load_model_config

    c = load_model_config(REPO / cfg_path)
    d, f, q, kv = (c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_size,
                   c.num_key_value_heads * c.head_size)
    pairs = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    return sum(rank * (i + o) for i, o in pairs) * c.num_hidden_layers


def test_lora_plans_train_the_adapters_only(lora_plans):
    from distill.models.families import load_model_config, param_count

    n = _adapter_elements("configs/students/tiny-qwen2.yaml", 4)
    base = param_count(load_model_config(REPO / "configs/students/tiny-qwen2.yaml"))
    for kind in ("lora", "qlora"):
        r = lora_plans[kind]
        a = r.analytic
        assert a["params"] == a["gradients"] == 4 * n, kind  # float32 adapters and their grads
        # AdamW's two float32 moments per adapter element, plus a few int32 step counts
        assert 8 * n <= a["optimizer"] < 8 * n + 64, kind
        assert r.params == base and f"{n:,} trainable" in r.adapters
        table = r.table()
        for part in ("parameters, frozen base", "adapters (trainable)", "optimizer state",
                     "gradients", "activations", "total per device"):
            assert f"| {part} |" in table, (part, table)
    # the bfloat16 base: 2 bytes a parameter; nf4 projections: about a quarter of that
    assert lora_plans["lora"].analytic["frozen"] == 2 * base
    assert lora_plans["qlora"].analytic["frozen"] < 0.8 * lora_plans["lora"].analytic["frozen"]
    assert "nf4 codes" in lora_plans["qlora"].adapters


def test_full_fine_tune_plan_is_larger_than_lora(lora_plans):
    full, lora = lora_plans["full"], lora_plans["lora"]
    assert full.adapters is None and full.analytic["frozen"] == 0
    assert full.analytic["optimizer"] > 10 * lora.analytic["optimizer"]
    assert lora.analytic["total"] < full.analytic["total"]
    assert lora.compiler["argument"] < full.compiler["argument"]
    # the frozen base gets no gradient: fewer FLOPs than the full step
    assert lora.compiler["flops"] < full.compiler["flops"]


def test_a_plan_that_does_not_fit_names_its_largest_part(lora_plans):
    import dataclasses

    lora = lora_plans["lora"]
    state = sum(v for k, v in lora.parts().items() if k != "activations")
    r = dataclasses.replace(lora, device_memory=state + 1, fits=False)  # the state fits alone
    assert "DOES NOT FIT" in r.table()
    [line] = [x for x in r.table().splitlines() if x.startswith("largest part (")]
    assert "temporaries" in line or "activations" in line, r.table()
    full = dataclasses.replace(lora_plans["full"], device_memory=1e4, fits=False)
    assert "student.lora" in full.largest_part()  # a full fine-tune is told LoRA exists
