"""Several processes on one run: they restore the same checkpoint step, and each reads only its
part of a model's weights (two processes on 127.0.0.1, CPU collectives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .disk import error_lines
from .runs import free_port, run_params, train_config, train_process

pytestmark = pytest.mark.slow

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
