"""The layer rule of the package (pyproject's import-linter contract, run by `make lint`): it holds
on the tree, and it fails on an import against it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the `distill` package of `cwd`
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contract_holds():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_an_import_against_the_layers_breaks_it(tmp_path):
    shutil.copytree(ROOT / "distill", tmp_path / "distill")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for module, wrong in (("verify.py", "distill.train.data"),  # core -> a stage
                          ("export.py", "distill.eval.metrics")):  # a stage -> a sibling stage
        path = tmp_path / "distill" / module
        before = path.read_text()
        path.write_text(before + f"\nimport {wrong}  # noqa\n")
        proc = lint(tmp_path)
        path.write_text(before)
        assert proc.returncode != 0, proc.stdout
        name = f"distill.{module.removesuffix('.py')}"
        assert f"{name} is not allowed to import {wrong.rsplit('.', 1)[0]}" in proc.stdout
