"""Toy runs shared by the training, generation and fault tests: their configs (the `world` fixture
in conftest.py holds the training data), `distill train` in processes of its own, and what is read
back from a run."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from tests.helpers import shared_compile_cache, start_cli

REPO = Path(__file__).resolve().parents[1]
PROMPTS = dict(source="synthetic", synthetic={"n": 2000, "style": "compact", "min_steps": 2,
                                              "max_steps": 2}, heldout_fraction=0.05)
KEEP_ALL = {"keep": "all", "reject_truncated": False, "require_think": False,
            "reject_empty_answer": False, "max_foreign_script": None, "dedup": "none"}


def train_config(world, path: Path, **sections) -> Path:
    """A training config of the tiny Qwen2 student on `world`'s traces, sections merged in."""
    cfg = {"student": {"init": str(REPO / "configs/students/tiny-qwen2.yaml"),
                       "tokenizer": str(world["tok"])},
           "data": {"traces": [str(world["traces"])], "seq_len": 128, "batch_size": 8},
           "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.01},
           "train": {"steps": 5, "log_every": 1, "checkpoint_every": 1000,
                     "async_checkpoints": False},
           "output_root": str(path.parent / "students")}
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def generate_config(path: Path, root: Path, teacher: dict, **sections) -> Path:
    """A generate config: 10 synthetic prompts, 2 samples each, every trace kept."""
    cfg = {
        "prompts": {"source": "synthetic", "synthetic": {"n": 10, "seed": 3},
                    "template": "{prompt} Put the answer in \\boxed{}."},
        "teacher": teacher,
        "sampling": {"n": 2, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24,
                     "seed": 7, "logprobs": 3},
        "filters": KEEP_ALL,
        "output": {"root": str(root), "prompts_per_shard": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_process(cfg: Path, env_extra=None) -> subprocess.Popen:
    """`distill train CFG` in a process of its own with 2 fake CPU devices (signals, several
    processes, a lost peer), compiling into the session's shared cache."""
    return start_cli(["train", cfg, "--quiet"], cwd=REPO,
                     env={"JAX_PLATFORMS": "cpu", **shared_compile_cache(),
                          "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                          **(env_extra or {})})


def run_params(run_dir: Path) -> list[np.ndarray]:
    """The parameters of a run's latest checkpoint, as arrays."""
    import jax
    from flax import nnx

    import distill

    model, _ = distill.load_pretrained(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def wait_for(pred, timeout=180) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
