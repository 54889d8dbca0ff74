"""Several processes on one run: they restore the same checkpoint step, and each reads only its
part of a model's weights (two processes on 127.0.0.1, CPU collectives)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from distill.models import safetensors_io
from distill.models.lazy import LazyTensor, outer_take
from distill.models.weights import hf_to_native, read_native

from . import toy
from .disk import error_lines
from .helpers import our_logits
from .runs import REPO, free_port, run_params, train_config, train_process

PAIR = dict(mesh="data=1,fsdp=2,tensor=1",
            train={"steps": 16, "checkpoint_every": 4, "log_every": 4, "keep_checkpoints": 3})


def _pair(cfg: Path):
    port = free_port()
    procs = [train_process(cfg, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                                 "DISTILL_COORDINATOR": f"127.0.0.1:{port}",
                                 "DISTILL_NUM_PROCESSES": "2", "DISTILL_PROCESS_ID": str(i)})
             for i in range(2)]
    out = []
    for p in procs:
        code = p.wait(timeout=300)
        stderr = p.stderr.read()
        assert code == 0, stderr[-6000:]
        out.append(stderr)
    return out


def _process_files(step_dir: Path, process: int) -> list[Path]:
    """The files of a checkpoint step that one process wrote (orbax's OCDBT keeps each
    process's data in a folder of its own)."""
    return [p for p in step_dir.rglob("*")
            if p.is_file() and f"ocdbt.process_{process}" in p.as_posix()]


@pytest.mark.slow
def test_processes_whose_newest_checkpoints_differ_resume_from_the_same_step(world, tmp_path):
    cfg = train_config(world, tmp_path / "run.yaml", **PAIR)
    _pair(cfg)
    run_dir = tmp_path / "students" / "run"
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [8, 12, 16]
    reference = run_params(run_dir)  # the uninterrupted run's end
    damaged = _process_files(ckpts / "16", 1)
    assert damaged and not set(damaged) & set(_process_files(ckpts / "16", 0))
    for p in damaged:  # process 1's part of step 16 truncated; process 0's whole
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    stderr = _pair(cfg)
    told = [[x for x in error_lines(s) if "cannot be restored" in x] for s in stderr]
    assert len(told[0]) == 1 and not told[1], stderr
    assert told[0][0].startswith(f"warning: {ckpts}/16 cannot be restored (process 1 of 2: ")
    assert told[0][0].endswith("; trying step 12"), told[0]
    print(told[0][0])
    assert "resuming from step 12; moved the newer checkpoint(s) 16 aside" in stderr[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "16", "16.unrestorable", "8"]
    for a, b in zip(run_params(run_dir), reference, strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Per-host weight reads


@pytest.mark.parametrize("layout, native", [("same", (6, 5)), ("flat", (3, 4)),
                                            ("t1", (5, 3, 4)), ("t2", (3, 4, 5))])
def test_a_native_part_reads_only_its_part_of_the_hf_tensor(layout, native):
    rng = np.random.RandomState(0)
    k = int(layout[1:]) if layout.startswith("t") else 0
    hf_shape = ((math.prod(native),) if layout == "flat" else native if not k else
                (math.prod(native[k:]), math.prod(native[:k])))
    w = rng.randn(*hf_shape).astype(np.float32)
    want = hf_to_native(w, native, layout)
    # a contiguous block, and a scattered one
    for index in ([np.arange(1, 3)] + [np.arange(n)[: max(1, n // 2)] for n in native[1:]],
                  [np.array([0, 2])] + [np.array([n - 1, 0]) for n in native[1:]]):
        part = read_native(_Array(w), layout, native, index)
        assert np.array_equal(part, want[np.ix_(*index)])


def test_parts_of_a_fused_tensor_and_of_an_fp8_weight_are_its_values_there():
    from distill.models.deepseek.hf import Dequantized

    rng = np.random.RandomState(0)
    fused = rng.randn(3, 8, 5).astype(np.float32)  # [E, 2F, D]
    gate = _Array(fused)[1, :4]
    assert gate.shape == (4, 5) and np.array_equal(gate.read(), fused[1, :4])
    rows, cols = np.array([3, 0]), np.arange(1, 4)
    assert np.array_equal(gate.read((rows, cols)), fused[1, :4][np.ix_(rows, cols)])
    w = rng.randn(40, 24).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.rand(3, 2).astype(np.float32)  # 16 x 16 blocks
    full = w.astype(np.float32) * np.repeat(np.repeat(scale, 16, 0), 16, 1)[:40, :24]
    lazy = Dequantized(_Array(w), _Array(scale), (16, 16))
    assert np.array_equal(lazy.read(), full)
    rows, cols = np.array([39, 2, 17]), np.arange(10, 20)
    assert np.array_equal(lazy.read((rows, cols)), full[np.ix_(rows, cols)])


class _Array(LazyTensor):
    def __init__(self, w):
        self.w, self.shape, self.dtype = w, w.shape, w.dtype

    def read(self, index=None):
        return outer_take(self.w, index)


LINEAR_SKIP = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")


def _fp8_deepseek(directory: Path, block=(16, 16)) -> Path:
    """The toy DeepSeek-V3 with 8 experts, its linear weights in FP8 e4m3 with `block` scales (so
    that a device's part of a weight takes part of its scales)."""
    src = toy.deepseek_dir(directory / "src", experts=8)
    out = directory / "fp8"
    out.mkdir()
    tensors = {}
    for name, t in safetensors_io.iter_checkpoint(src):
        w = t.read()
        if w.ndim == 2 and name.endswith(".weight") and not any(s in name for s in LINEAR_SKIP):
            (o, i), (bo, bi) = w.shape, block
            scale = np.ones((-(-o // bo), -(-i // bi)), np.float32)
            for r in range(scale.shape[0]):
                for c in range(scale.shape[1]):
                    scale[r, c] = np.abs(w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi]).max() / 448
            full = np.repeat(np.repeat(scale, bo, 0), bi, 1)[:o, :i]
            tensors[name] = (w / full).astype(ml_dtypes.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale
        else:
            tensors[name] = w
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config))
    safetensors_io.write_file(out / "model.safetensors",
                              [(k, v.shape, v.dtype) for k, v in tensors.items()],
                              lambda k: tensors[k])
    return out


# each of two processes (4 CPU devices each) loads onto one mesh: the bytes it read, its params'
# shards checked bitwise against a whole load, and (process 0) the logits
_LOAD = """
import json, sys
import jax, numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
import distill
from distill.models import safetensors_io
from distill.models.lazy import LazyTensor, outer_take
from distill.multihost import initialize
from distill.parallel import make_mesh
src, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
initialize(f"127.0.0.1:{port}", 2, pid)
mesh = make_mesh({"fsdp": 2, "expert": 4})
model, _ = distill.load_pretrained(src, mesh=mesh)
read = safetensors_io.READS.bytes
ids = jax.device_put(np.load(out + "/ids.npy"), NamedSharding(mesh, PartitionSpec()))
logits = multihost_utils.process_allgather(nnx.jit(lambda m, x: m(x))(model, ids), tiled=True)
plain, _ = distill.load_pretrained(src)
whole = dict(nnx.to_flat_state(nnx.state(plain)))
equal = all(np.array_equal(np.asarray(s.data), np.asarray(whole[k][...])[s.index])
            for k, v in nnx.to_flat_state(nnx.state(model)) for s in v[...].addressable_shards)
if pid == 0:
    np.save(out + "/logits.npy", np.asarray(logits))
print(json.dumps({"read": read, "equal": equal}))
"""


@pytest.mark.slow
def test_two_processes_each_read_only_their_part_of_the_weights(tmp_path):
    import distill

    src = _fp8_deepseek(tmp_path)
    size = sum(t.dtype.itemsize * math.prod(t.shape)
               for _, t in safetensors_io.iter_checkpoint(src))  # the tensor data
    ids = np.random.RandomState(1).randint(3, 320, (2, 24)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    # one process: everything read once, the same parameters as without a mesh
    from distill.parallel import make_mesh

    before = safetensors_io.READS.bytes
    sharded, _ = distill.load_pretrained(src, mesh=make_mesh({"fsdp": 2, "expert": 4}))
    assert safetensors_io.READS.bytes - before == size
    plain, _ = distill.load_pretrained(src)
    want = our_logits(plain, ids)
    np.testing.assert_allclose(our_logits(sharded, ids), want, atol=1e-5, rtol=0)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(src), str(port), str(i),
                               str(tmp_path)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    told = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-6000:]
        told.append(json.loads(out.strip().splitlines()[-1]))
    ratios = [t["read"] / size for t in told]
    print(f"checkpoint tensor data {size} bytes; read per process {[t['read'] for t in told]} "
          f"({', '.join(f'{r:.3f}' for r in ratios)} of it)")
    assert all(t["equal"] for t in told)
    assert all(r <= 0.6 for r in ratios), ratios
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-5, rtol=0)
