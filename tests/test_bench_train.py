"""`distill bench` training throughput: a smoke test at toy size (no timing assertions)."""

from pathlib import Path

import pytest

import distill.bench.train as bt
from distill.bench.train import SMOLLM2_135M, bench_train, train_table
from distill.errors import DistillError
from distill.models.families import load_model_config, param_count
from distill.train.flops import dense_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "students" / "tiny-qwen2.yaml"


@pytest.fixture(scope="module")
def rows():
    # the first policy is told the machine has 1 kB free (so it must be skipped); the second
    # sees the real free memory
    free = iter([1000, None])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bt, "_free_bytes", lambda: next(free))
        return bench_train(batch=2, seq_len=16, steps=2, preset=TINY, remats=("none", "dots"),
                           torch_compile=False, peak_sizes=(128,))


def test_rows_cover_both_sides_with_positive_figures(rows):
    timed = [r for r in rows if not r["skipped"]]
    assert [(r["impl"], r["setting"].split(" ")[0]) for r in timed] == [
        ("distill", "remat=dots"), ("transformers", "eager")]
    for r in timed:
        assert r["batch"] == 2 and r["seq_len"] == 16 and r["steps"] == 2
        assert len(r["step_s_all"]) == 2 and len(r["peak_flops_per_s_all"]) == 3
        for key in ("step_s", "tokens_per_s", "flops_per_token", "flops_per_s",
                    "peak_flops_per_s", "mfu", "vs_transformers"):
            assert r[key] > 0, key
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["peak_flops_per_s"])
    assert timed[0]["best"] and not timed[1]["best"]
    assert timed[0]["temp_bytes"] > 0
    assert timed[1]["vs_transformers"] == pytest.approx(1.0)


def test_policy_that_does_not_fit_is_skipped_with_a_row_saying_so(rows):
    skipped = [r for r in rows if r["skipped"]]
    assert [r["setting"] for r in skipped] == ["remat=none"]
    assert "GB of temporaries" in skipped[0]["skipped"]
    assert "tokens_per_s" not in skipped[0]


def test_flops_and_params_match_the_preset(rows):
    cfg = load_model_config(TINY)
    assert rows[0]["flops_per_token"] == dense_flops_per_token(cfg, 16)
    assert rows[0]["params"] == param_count(cfg)
    assert rows[0]["model"] == "tiny-qwen2"


def test_table_names_every_row(rows):
    lines = train_table(rows)
    assert "peak" in lines[0] and "MFU" in lines[2]
    body = lines[4:-1]  # a blank line ends the table
    assert len(body) == len(rows)
    text = "".join(body)
    assert "remat=dots (best)" in text and "eager" in text and "skipped" in text
    assert train_table([]) == []


def test_default_shape_is_smollm2_135m():
    # ~100-150M parameters, the size the issue asks the comparison at
    assert param_count(SMOLLM2_135M) == 134_515_008


def test_moe_preset_is_refused():
    with pytest.raises(DistillError, match="dense"):
        bench_train(preset=ROOT / "configs" / "teachers" / "tiny-moe.yaml")


def test_the_benchmarks_find_their_presets():
    """The presets the benchmarks load, found from the package's own location."""
    from distill.bench.decode import PRESETS
    from distill.bench.train import QWEN25_1_5B

    assert QWEN25_1_5B.is_file()
    assert all(p.is_file() for p in PRESETS.values())
