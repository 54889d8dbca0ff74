"""`distill bench --suite device` on CPU with small shapes: the command the accelerator run
uses, end to end from a fresh process, writing one JSON file (figures present and consistent;
no timing assertions). And the suites' progress: a line per suite, its table when done."""

import json

import numpy as np
import pytest

from distill.bench.device import nominal, packed_batch
from distill.train.flops import dense_flops_per_token
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli(["bench", "--suite", "device", "--out", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "device.json").read_text())


def test_device_suite_reports_every_figure(device_run):
    stdout, r = device_run
    assert r["platform"] == "cpu" and r["small"] is True
    paths = {k["path"] for k in r["kernels"]}
    assert paths == {"splash+interpret", "pallas_gpu+interpret", "blockwise"}
    for k in r["kernels"]:  # every kernel's parity holds, forward and gradients
        assert k["ok"], k
        assert set(k["max_relative_error"]) == {"out", "dq", "dk", "dv"}
    assert [t["model"] for t in r["train"]] == ["qwen2.5-1.5b shape", "qwen2.5-7b shape"]
    assert [t["param_dtype"] for t in r["train"]] == ["float32", "bfloat16"]
    for t in r["train"]:
        assert t["step_s"] > 0 and t["mfu_vs_measured_peak"] > 0  # figures, not judged here
        assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["step_s"])
        assert t["time_to_first_step_s"] > 0
    assert r["time_to_first_step_s"] == r["train"][0]["time_to_first_step_s"]
    assert [d["batch"] for d in r["decode"]] == [1, 64]
    for d in r["decode"]:
        assert d["tokens_per_s"] > 0 and d["bandwidth_limit_tokens_per_s"] > 0
        assert d["limit_over_achieved"] == pytest.approx(
            d["bandwidth_limit_tokens_per_s"] / d["tokens_per_s"])
    # one progress line per benchmark, then the table, then where the JSON went
    for line in ("[1/1] device:", "| kernel |", "| training step |", "| decode |", "done in"):
        assert line in stdout, line


def test_packed_batch_counts_attention_within_documents():
    batch, context = packed_batch(1000, 1024)
    seg = batch["segment_ids_bt"][0]
    lengths = [int((seg == s).sum()) for s in range(1, seg.max() + 1)]
    assert sum(lengths) == 1024 and min(lengths) >= 1 and (seg > 0).all()
    assert context == pytest.approx(sum(n * n for n in lengths) / 1024) and context < 1024
    starts = [0, *np.cumsum(lengths)[:-1]]
    assert all(batch["positions_bt"][0, s] == 0 for s in starts)  # positions restart

    class Cfg:  # attention FLOPs shrink with the documents' lengths, matmul FLOPs do not
        hidden_size, num_hidden_layers, vocab_size = 64, 2, 100
        head_size, num_attention_heads, num_key_value_heads, intermediate_size = 16, 4, 2, 128
    assert dense_flops_per_token(Cfg, context) < dense_flops_per_token(Cfg, 1024)


def test_nominal_figures_by_device_kind():
    assert nominal("NVIDIA H200") == (989e12, 4.8e12)
    assert nominal("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert nominal("NVIDIA H100 PCIe")[0] == 756e12
    assert nominal("TPU v5 lite") == (197e12, 0.82e12)
    assert nominal("cpu") == (None, None)
