"""Faults beyond kill -9: a full disk under every writer (a tmpfs too small, `tests.disk`), a
corrupted checkpoint, a lost host.

Each full-disk case checks the one error line (exit 2) that names the file and what is safe, that
no temporary file is left and the previous state is untouched, and that the rerun, with space
freed, ends exactly where an uninterrupted run does."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.data import store as data_store

from . import toy
from .disk import error_lines, run_on_small_disk
from .helpers import DISTILL, invoke_cli, run_cli, shared_compile_cache
from .runs import free_port, generate_config, run_params, train_config, train_process, wait_for

REPO = Path(__file__).resolve().parents[1]
CPU = {"JAX_PLATFORMS": "cpu"}
ENV = {**os.environ, **CPU}  # for the runs on a small disk
TWO_DEVICES = "--xla_force_host_platform_device_count=2"  # as tests.runs.train_process
NO_SPACE = "cannot write (no space left on device)"


def _one_error(run: dict) -> str:
    lines = [x for x in error_lines(run["stderr"]) if "%|" not in x]  # progress bars aside
    assert run["rc"] == 2 and len(lines) == 1, run["stderr"][-3000:]
    return lines[0]


def _temporaries(files: dict) -> list[str]:
    return [f for f in files if ".tmp" in f or "orbax-checkpoint-tmp" in f]


def test_generate_on_a_full_disk_says_what_is_safe_and_resumes_exactly(tmp_path, teacher_dir):
    def cfg(name, root):
        return generate_config(tmp_path / f"{name}.yaml", root,
                               {"kind": "jax", "model": str(teacher_dir), "engine": {"slots": 4}},
                               prompts={"synthetic": {"n": 40, "seed": 3}})

    ref = cfg("gen", tmp_path / "ref")
    done = invoke_cli(["generate", ref, "--quiet"], cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "disk"
    run = [*DISTILL, "generate", str(cfg("gen", root)), "--quiet"]
    full, resumed = run_on_small_disk(root, [(120, run), (4096, run)], env=ENV, cwd=REPO)
    line = _one_error(full)
    manifest_path = root / "gen" / "manifest.json"
    assert line.startswith(f"error: {root}/gen/") and NO_SPACE in line, line
    # what the line says is safe is what the manifest listed when the disk filled
    listed = [f for f in full["files"] if f.startswith("gen/data/shard-")]
    assert f"{len(listed)} shards" in line and str(manifest_path) in line
    assert 0 < len(listed) < 20 and not _temporaries(full["files"])
    assert "free space and rerun the same command to resume" in line
    assert resumed["rc"] == 0, resumed["stderr"][-3000:]
    ours, theirs = (data_store.read_table(r / "gen").to_pylist() for r in (root, tmp_path / "ref"))
    assert ours == theirs and len(ours) == 80


def test_train_on_a_full_disk_says_what_is_safe_and_resumes_bitwise(world, tmp_path):
    common = dict(train={"steps": 16, "checkpoint_every": 4, "log_every": 4,
                         "async_checkpoints": True})
    proc = train_process(train_config(world, tmp_path / "ref.yaml", **common))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    root = tmp_path / "disk"
    cfg = train_config(world, tmp_path / "run.yaml", **common, output_root=str(root))
    run = [*DISTILL, "train", str(cfg), "--quiet"]
    # 200 KiB: the tokenized cache does not fit; 4 MiB: two checkpoints fit, the third does not
    cache, ckpt, done = run_on_small_disk(root, [(200, run), (4096, run), (65536, run)],
                                          env={**ENV, **shared_compile_cache(),
                                               "XLA_FLAGS": TWO_DEVICES},
                                          cwd=REPO)
    line = _one_error(cache)
    assert line.startswith(f"error: {root}/.cache/tokens/") and NO_SPACE in line, line
    assert "finished parts are kept" in line and not _temporaries(cache["files"])
    line = _one_error(ckpt)
    assert line == (f"error: {root}/run/checkpoints/12: {NO_SPACE}; the checkpoint of step 8 is "
                    "safe; free space and rerun the same command to resume from it"), line
    assert not _temporaries(ckpt["files"])
    assert {f.split("/")[2] for f in ckpt["files"] if f.startswith("run/checkpoints/")} == {"4", "8"}
    assert done["rc"] == 0, done["stderr"][-3000:]
    for a, b in zip(run_params(root / "run"), run_params(tmp_path / "students" / "ref"),
                    strict=True):
        assert np.array_equal(a, b)


def _truncate_all(folder: Path) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return len(files)


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(world, tmp_path):
    common = dict(train={"steps": 16, "checkpoint_every": 4, "log_every": 4,
                         "keep_checkpoints": 3})
    ref = train_process(train_config(world, tmp_path / "ref.yaml", **common))
    run = train_process(train_config(world, tmp_path / "run.yaml", **common))
    for p in (ref, run):
        assert p.wait(timeout=300) == 0, p.stderr.read()
    run_dir = tmp_path / "students" / "run"
    ckpts = run_dir / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir()) == [8, 12, 16]
    assert _truncate_all(ckpts / "16") > 5
    # `distill sample` loads step 12 and says so
    sample = run_cli(["sample", run_dir, "--prompt", "1+1", "--max-new-tokens", "4"], cwd=REPO,
                     env=CPU)
    assert sample.returncode == 0, sample.stderr[-3000:]
    lines = error_lines(sample.stderr)
    assert lines[0].startswith(f"warning: {ckpts}/16 cannot be restored (") and \
        lines[0].endswith("; trying step 12"), lines
    assert lines[1:] == [f"{run_dir}: loaded the checkpoint of step 12"]
    # `distill train` resumes from step 12, moves 16 aside and ends where the reference does
    resumed = train_process(train_config(world, tmp_path / "run.yaml", **common))
    assert resumed.wait(timeout=300) == 0
    out = resumed.stdout.read() + resumed.stderr.read()
    assert "resuming from step 12; moved the newer checkpoint(s) 16 aside" in out, out
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "16", "16.unrestorable", "8"]
    for a, b in zip(run_params(run_dir), run_params(tmp_path / "students" / "ref"), strict=True):
        assert np.array_equal(a, b)


def test_checksums_catch_one_flipped_bit_and_restore_newest_falls_back():
    import jax.numpy as jnp

    from distill.errors import DistillError
    from distill.runs import checksums, restore_newest, verify_checksums

    tree = {"params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
                       "b": jnp.ones(3, jnp.bfloat16)}, "step": jnp.int32(7)}
    sums = checksums(tree)
    assert set(sums) == {"params/w", "params/b", "step"}
    verify_checksums(tree, sums, "ck/4")
    bits = np.asarray(tree["params"]["w"]).view(np.uint32).copy()
    bits[1, 2] ^= 1 << 9
    flipped = {**tree, "params": {**tree["params"], "w": jnp.asarray(bits.view(np.float32))}}
    with pytest.raises(DistillError, match="ck/4: params/w does not match its checksum"):
        verify_checksums(flipped, sums, "ck/4")

    def restore(step):
        if step == 12:
            raise ValueError("truncated\nmore")
        return f"state {step}"

    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("distill.runs.committed_steps", lambda _: [4, 8, 12])
        assert restore_newest(Path("ck"), restore, log=lines.append) == (8, "state 8")
    assert lines == ["warning: ck/12 cannot be restored (truncated); trying step 8"]


def _tree(root: Path) -> dict[str, str]:
    """{path relative to root's parent: sha256} (as `run_on_small_disk` lists files)."""
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _kib(root: Path) -> int:
    """What `root` takes on a tmpfs, in KiB (whole 4 KiB pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in root.rglob("*") if p.is_file())


def _fails_then_redone(root: Path, previous: Path, argv: list[str]) -> tuple[dict, dict]:
    """`argv` run on a disk that holds `previous` (what the command replaces) and half as much
    again, then on one with room for both."""
    before = _tree(previous)
    size = _kib(root)
    full, redone = run_on_small_disk(root, [(size + _kib(previous) // 2, argv),
                                            (3 * size + 1024, argv)], env=ENV, cwd=REPO)
    line = _one_error(full)
    assert line.startswith("error: ") and NO_SPACE in line and not _temporaries(full["files"])
    assert full["files"] == before, full["files"]  # untouched, and nothing else left
    assert redone["rc"] == 0, redone["stderr"][-3000:]
    return line, before


def test_export_on_a_full_disk_leaves_the_previous_export(tmp_path):
    student = toy.qwen2_dir(tmp_path / "student")
    root, out = tmp_path / "disk", tmp_path / "disk" / "hf"
    args = ["export", str(student), "--out", str(out), "--force"]
    assert invoke_cli(args, cwd=REPO).returncode == 0
    line, before = _fails_then_redone(root, out, [*DISTILL, *args])
    assert line.endswith(f"{out} is as it was; free space and rerun the same command"), line
    assert _tree(out) == before  # the same export, written again


def test_eval_on_a_full_disk_keeps_its_samples_and_the_previous_report(tmp_path):
    """The disk fills while samples stream (one line: the samples so far are kept), then while
    the report is written (the previous report untouched, every sample kept); with space freed
    the rerun samples only the rest and writes the report an uninterrupted run does."""
    student = toy.qwen2_dir(tmp_path / "student")
    root, out = tmp_path / "disk", tmp_path / "disk" / "report"
    partial = root / "report.partial" / "samples.jsonl"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({
        "prompts": {"source": "synthetic", "synthetic": {"n": 40, "seed": 1}, "split": "heldout",
                    "heldout_fraction": 0.25},
        "models": [{"name": "student", "model": str(student)}],
        "protocol": {"n": 4, "max_new_tokens": 16, "seed": 0}, "output": str(out)}))
    args = ["eval", str(cfg), "--quiet"]
    first = invoke_cli(args, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    previous, before = (out / "samples.jsonl").read_text(), _tree(out)
    size, run = _kib(root), [*DISTILL, *args]
    # the work file holds fewer fields than the report's samples.jsonl; and a fingerprint page
    samples_kib = -(-(out / "samples.jsonl").stat().st_size // 4096) * 4 + 4
    runs = run_on_small_disk(root, [
        (size + 8, run),  # the fingerprint and one page of samples
        (size + 8, ["cat", str(partial)]),
        (size + samples_kib + _kib(out) // 2, run),  # every sample, not the report
        (3 * size + 1024, run)], env={**ENV, **shared_compile_cache()}, cwd=REPO)
    sampling, shown, reporting, redone = runs
    kept = len(shown["stdout"].split("\n")) - 1  # whole lines (a torn last one aside)
    total = len(previous.splitlines())  # 11 held-out prompts x (4 samples + greedy)
    assert 0 < kept < total
    line = _one_error(sampling)
    assert line == (f"error: {partial}: cannot write (no space left on device); the {kept} "
                     f"samples made before are kept in {partial}; free space and rerun the same "
                     "command: it samples only the rest"), line
    line = _one_error(reporting)
    assert line.endswith(f"the previous report in {out} is untouched; the {total} samples are "
                         f"kept in {partial}; free space and rerun the same command"), line
    for r in (sampling, reporting):
        report = {k: v for k, v in r["files"].items() if k.startswith("report/")}
        assert report == before and not _temporaries(r["files"])  # untouched
    assert redone["rc"] == 0, redone["stderr"][-3000:]
    assert (out / "samples.jsonl").read_text() == previous
    assert set(redone["files"]) == set(before)  # the work folder gone, no temporaries


# ---------------------------------------------------------------------------------------------
# A lost host

# 60 steps: the victim is killed as the first checkpoint (step 20) lands, 40 steps before the end
PAIR = dict(mesh="data=1,fsdp=2,tensor=1", distributed={"lost_after_s": 10},
            train={"steps": 60, "checkpoint_every": 20, "log_every": 20,
                   "async_checkpoints": True})


def _pair(cfg: Path, port: int) -> list[subprocess.Popen]:
    return [train_process(cfg, {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                             "DISTILL_COORDINATOR": f"127.0.0.1:{port}",
                             "DISTILL_NUM_PROCESSES": "2", "DISTILL_PROCESS_ID": str(i)})
            for i in range(2)]


@pytest.fixture(scope="module")
def pair_reference(world, tmp_path_factory):
    """The parameters of an uninterrupted two-process run, and its tokenized cache (which the
    interrupted runs reuse: they lose a host long after their cache is complete)."""
    root = tmp_path_factory.mktemp("pair")
    data = {"cache_dir": str(root / "cache")}
    cfg = train_config(world, root / "ref.yaml", **PAIR, data=data)
    for p in _pair(cfg, free_port()):
        assert p.wait(timeout=300) == 0, p.stderr.read()
    return run_params(root / "students" / "ref"), data


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator-lost", "worker-lost"])
def test_a_lost_process_stops_the_other_in_one_line_and_the_pair_resumes_bitwise(
        world, tmp_path, pair_reference, victim):
    reference, data = pair_reference
    cfg = train_config(world, tmp_path / "run.yaml", **PAIR, data=data)
    ckpts = tmp_path / "students" / "run" / "checkpoints"
    procs = _pair(cfg, free_port())
    assert wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()))
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - victim]
    code = survivor.wait(timeout=120)
    elapsed = time.time() - killed
    stderr = survivor.stderr.read()
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr[-6000:]
    assert lines[0].startswith(f"error: process {1 - victim} of 2 lost contact with the run's "
                               "other processes (")
    assert lines[0].endswith("is safe; restart every process with the same command to resume "
                             "from it"), lines[0]
    # how soon is reported, not judged (the watchdog's 10 s, or at once when the coordinator
    # goes): the wait's timeout above is the bound on a survivor that never stops
    print(f"victim {victim}: the survivor stopped {elapsed:.1f} s after the kill: {lines[0]}")
    for p in _pair(cfg, free_port()):
        assert p.wait(timeout=300) == 0, p.stderr.read()
    for a, b in zip(run_params(tmp_path / "students" / "run"), reference, strict=True):
        assert np.array_equal(a, b)


def test_a_collective_whose_peer_left_is_told_from_other_runtime_errors():
    from distill.multihost import peer_gone

    gone = Exception("INTERNAL: Error dispatching computation: ...\nUNKNOWN: Gloo AllGather failed: "
                     "[external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
                     "[127.0.0.1]:26549: Connection reset by peer")
    assert peer_gone(gone) == ("Gloo AllGather failed: Read error [127.0.0.1]:26549: "
                               "Connection reset by peer")
    assert peer_gone(Exception("Gloo AllReduce failed: size mismatch")) is None
    assert peer_gone(Exception("RESOURCE_EXHAUSTED: out of memory")) is None
