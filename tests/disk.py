"""A full disk for the tests: commands run with a small tmpfs mounted over a folder, in a mount
namespace of their own (`unshare --user --map-root-user --mount`, so no root is needed where user
namespaces are allowed). The kernel then fails writes with ENOSPC exactly as a full disk does, in
Python, Arrow and tensorstore (orbax) alike.

    result = run_on_small_disk(root, [(sizes_kib, argv), ...], env=..., cwd=...)

runs each argv in turn with the tmpfs at `root` resized to its size (a remount keeps the files:
raising the size is how a test frees space), records after each one its exit code, stderr and the
files under `root`, and copies the tmpfs's files back to `root` at the end so that the test can
read them. The driver is this file, run as a script inside the namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def run_on_small_disk(root: Path, runs: list[tuple[int, list[str]]], *, env=None,
                      cwd=None, timeout: float = 900) -> list[dict]:
    """[{rc, stdout, stderr, files: {relative path: sha256}}] per run (see the module
    docstring)."""
    if not _can_unshare():
        pytest.skip("this machine cannot mount a tmpfs in a user namespace (unshare -rm)")
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        plan = Path(scratch, "plan.json")
        plan.write_text(json.dumps({"root": str(root), "runs": runs,
                                    "out": str(Path(scratch, "result.json"))}))
        proc = subprocess.run(["unshare", "-rm", sys.executable, __file__, str(plan)], env=env,
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(Path(scratch, "result.json").read_text())


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _drive(plan_path: str) -> None:
    """Inside the namespace: copy `root` aside, mount the tmpfs over it, copy the files in, run."""
    plan = json.loads(Path(plan_path).read_text())
    root = Path(plan["root"])
    with tempfile.TemporaryDirectory() as seed:
        shutil.copytree(root, seed, dirs_exist_ok=True)  # what the test put there beforehand
        results = []
        for i, (kib, argv) in enumerate(plan["runs"]):
            opts = f"size={kib}k" + (",remount" if i else "")
            subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(root)], check=True)
            if i == 0:
                shutil.copytree(seed, root, dirs_exist_ok=True)
            proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
            results.append({"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
                            "files": _files(root)})
        keep = Path(seed, "after")
        shutil.copytree(root, keep)
        subprocess.run(["umount", str(root)], check=True)
        shutil.rmtree(root)
        shutil.copytree(keep, root)
    Path(plan["out"]).write_text(json.dumps(results))


def error_lines(stderr: str) -> list[str]:
    """The lines of a command's stderr that are not JAX's or absl's start-up chatter."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith(("WARNING:", "I0", "W0"))]


if __name__ == "__main__":
    _drive(sys.argv[1])
