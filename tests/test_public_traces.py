"""The public reasoning datasets in: schema presets, rendering, training, `distill traces import`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.chat import completion_text
from distill.data.prompts import prompt_hash_id
from distill.data.render import render_example
from distill.data.schemas import split_reply
from distill.data.store import read_manifest, read_table
from distill.data.traces import TraceSource, open_traces, read_traces
from distill.errors import DistillError
from distill.tokenizer import Tokenizer
from tests import public_datasets as pub
from tests import toy
from tests.helpers import assert_user_error, invoke_cli, run_cli

REPO = Path(__file__).resolve().parents[1]

# (fixture builder, file name, the preset auto-detection picks, traces kept by default)
DATASETS = {
    "openr1_math": (pub.openr1_math, "openr1/data/train-00000-of-00001.parquet", "openr1_math", 6),
    "mixture_of_thoughts": (pub.mixture_of_thoughts, "mot/math/train-0.parquet", "messages", 8),
    "openthoughts": (pub.openthoughts, "ot/data/train-0.parquet", "sharegpt", 5),
    "openthoughts3": (pub.openthoughts3, "ot3/data/train-0.parquet", "sharegpt", 5),
    "s1k": (pub.s1k, "s1k/data/train-0.parquet", "columns", 4),
    "am": (pub.am_distilled, "am/am_0.9M.jsonl.zst", "messages", 5),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    return {name: build(root / fname) for name, (build, fname, _, _) in DATASETS.items()}


@pytest.mark.parametrize("name", DATASETS)
def test_each_public_schema_reads_as_traces(files, name):
    _, _, preset, kept = DATASETS[name]
    opened = open_traces(TraceSource(source=str(files[name])))
    assert opened.preset == preset
    traces = read_traces([str(files[name])]).datasets[0]
    assert len(traces) == kept
    for t in traces:
        assert t.reasoning and t.answer and t.prompt[-1]["role"] == "user"
        assert "<think>" not in t.reasoning + t.answer and "<|" not in t.reasoning + t.answer
        assert "<answer>" not in t.answer
    # a folder finds the same files (as a hub snapshot lays them out)
    fname = DATASETS[name][1]
    folder = Path(str(files[name])[:-len(fname)]) / fname.split("/")[0]
    assert len(read_traces([str(folder)]).datasets[0]) == kept


def test_openr1_keeps_exactly_the_correct_finished_generations(files):
    traces = read_traces([str(files["openr1_math"])]).datasets[0]
    # per row: (right, stop) kept; (right, length), (wrong, stop), (right, null reason but
    # incomplete) dropped
    # (ids: the problem's hash, as every prompt source ids a problem text)
    assert [t.id for t in traces] == [f"{prompt_hash_id(f'Compute {3 + i} + {4 + 2 * i}.')}#0"
                                      for i in range(6)]
    assert all("Attempt 0" in t.reasoning for t in traces)
    every = read_traces([TraceSource(source=str(files["openr1_math"]), keep="all")]).datasets[0]
    assert len(every) == 24
    complete = read_traces([str(files["openr1_math"])], keep="complete").datasets[0]
    assert sorted({t.id[-1] for t in complete}) == ["0", "2"]


def test_openr1_counts_the_llama_judge_where_math_verify_failed(tmp_path):
    row = pub.openr1_row(0, [(False, "stop", True), (False, "stop", True)])
    row["correctness_llama"] = [True, None]
    path = tmp_path / "judged.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=pub.OPENR1_SCHEMA), path)
    assert [t.id.rsplit("#", 1)[1] for t in read_traces([str(path)]).datasets[0]] == ["0"]


def test_system_prompts_are_kept_or_dropped(files):
    kept = read_traces([str(files["openthoughts"])]).datasets[0]
    assert kept[0].prompt[0] == {"role": "system", "content": pub.SYSTEM_SKY_T1}
    dropped = read_traces([TraceSource(source=str(files["openthoughts"]), drop_system=True)])
    assert [m["role"] for m in dropped.datasets[0][0].prompt] == ["user"]


def test_multi_turn_trains_on_every_assistant_turn(files):
    traces = read_traces([str(files["mixture_of_thoughts"])]).datasets[0]
    first, second = traces[-2:]
    assert first.prompt_id == second.prompt_id and (first.id, second.id) == (
        f"{first.prompt_id}#0", f"{first.prompt_id}#1")
    assert [m["role"] for m in second.prompt] == ["system", "user", "assistant", "user"]
    assert second.prompt[2]["content"] == "It is 4."  # an earlier reply: its answer, no reasoning
    assert (second.reasoning, second.answer) == ("4 * 2 = 8", "Doubled, it is 8.")


@pytest.mark.parametrize("name", DATASETS)
def test_rendered_ids_equal_the_chat_template_of_the_conversation(files, smollm2_tokenizer, name):
    """What a student trains on is the ids its own chat template gives for the conversation
    with the reply in it (ChatML writes assistant contents as they are), up to EOS."""
    smol = smollm2_tokenizer  # a real ChatML template (SmolLM2, Qwen2.5)
    for t in read_traces([str(files[name])]).datasets[0]:
        ids, mask = render_example(smol, t.prompt, t.reasoning, t.answer)
        reply = "<think>\n" + completion_text(t.reasoning, t.answer)
        text = smol.apply_chat_template(t.prompt + [{"role": "assistant", "content": reply}])
        expected = smol.encode(text, add_special_tokens=False)
        assert ids.tolist() == expected[:len(ids)] and ids[-1] == smol.eos_token_id
        prompt_len = len(smol.encode(smol.apply_chat_template(t.prompt, add_generation_prompt=True),
                                     add_special_tokens=False))
        assert not mask[:prompt_len].any() and mask[prompt_len:].all()


def test_r1_template_renders_the_history_its_own_way(files, tmp_path):
    """With the R1-Distill template (which drops reasoning from earlier replies), the prompt part
    of a later turn is exactly the template's rendering of the conversation so far."""
    tok = Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / "tok"))
    second = read_traces([str(files["mixture_of_thoughts"])]).datasets[0][-1]
    ids, mask = render_example(tok, second.prompt, second.reasoning, second.answer)
    prompt = tok.encode(tok.apply_chat_template(second.prompt, add_generation_prompt=True),
                        add_special_tokens=False)
    assert ids[:len(prompt)].tolist() == prompt and int(np.argmax(mask)) == len(prompt)


def test_every_schema_trains_a_tiny_student(files, tmp_path):
    """The six fixtures as one mixture train a tiny Qwen2 student (toy tokenizer) a few steps."""
    from distill.train.loop import run_train

    tok = toy.write_tokenizer(tmp_path / "tok", vocab_size=512)
    config = {"student": {"init": str(REPO / "configs/students/tiny-qwen2.yaml"),
                          "tokenizer": str(tok)},
              "data": {"traces": [str(files[n]) for n in DATASETS], "seq_len": 256,
                       "batch_size": 8},
              "optim": {"lr": 3e-3, "warmup_steps": 0},
              "train": {"steps": 3, "log_every": 1, "checkpoint_every": 1000,
                        "async_checkpoints": False},
              "output_root": str(tmp_path / "students")}
    path = tmp_path / "public.yaml"
    path.write_text(json.dumps(config))
    result = run_train(path, progress=False)
    assert result.step == 3 and len(result.losses) == 3 and all(np.isfinite(result.losses))


def test_split_reply_markers():
    assert split_reply(pub.marked("r", "s")) == ("r", "s", True)
    assert split_reply("<|begin_of_thought|>\n\nr cut off") == ("r cut off", "", False)
    assert split_reply("<think>r</think>\n<answer>\nA\n</answer>") == ("r", "A", True)
    assert split_reply("<think>\nr still going") == ("r still going", "", False)
    assert split_reply("just an answer") == ("", "just an answer", True)


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, exit 2, nothing written


def test_an_unknown_schema_names_the_columns_and_the_presets(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), path)
    with pytest.raises(DistillError) as e:
        read_traces([str(path)])
    msg = str(e.value)
    assert msg.startswith(f"{path}: unknown trace schema (columns: text, label); known: distill")
    for name in ("openr1_math", "sharegpt", "messages", "columns"):
        assert name in msg
    assert msg.endswith("; set preset: to one of them")  # the key a trace source has
    assert "preset" in TraceSource.model_fields


def test_a_missing_column_of_a_named_preset(files):
    with pytest.raises(DistillError, match=r"schema openr1_math needs column 'problem' \(columns: "
                                           r"messages, num_tokens, source\)"):
        read_traces([TraceSource(source=str(files["mixture_of_thoughts"]), preset="openr1_math")])


def test_a_row_of_the_wrong_shape_names_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": 7}]}) + "\n")
    with pytest.raises(DistillError, match=r"bad\.jsonl:1: message 1's content is not text "
                                           r"\(got int\) \(schema messages\)"):
        read_traces([str(path)])


def test_cli_bad_input_is_one_line_exit_2_nothing_written(tmp_path, files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"text": ["a"]}), odd)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pub.OPENR1_SCHEMA), empty)
    split = tmp_path / "snapshot" / "test"  # a hub snapshot's split whose shards hold no rows
    split.mkdir(parents=True)
    for k in range(2):
        pq.write_table(pa.Table.from_pylist([], schema=pub.MOT_SCHEMA), split / f"{k}.parquet")
    saved = tmp_path / "saved"
    rows = {"messages": [[{"role": "user", "content": "q"}]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    cases = {
        "unknown schema": ([str(odd)], "unknown trace schema (columns: text)"),
        "missing column": ([str(files["s1k"]), "--preset", "sharegpt"],
                           "schema sharegpt needs column 'conversations'"),
        "empty file": ([str(empty)], "the dataset is empty (0 rows)"),
        "empty split": ([str(split)], "the dataset is empty (0 rows)"),
        "no such split": ([str(saved), "--split", "test"], "no split 'test' (splits: train)"),
        "offline hub": (["distill-test/no-such-traces-0000"],
                        "cannot load hub dataset 'distill-test/no-such-traces-0000' split "
                        "'train': offline (HF_HUB_OFFLINE=1) and not in the local cache"),
    }
    env_offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "HF_HOME": str(tmp_path / "hf")}
    for why, (args, expected) in cases.items():
        for k, v in env_offline.items():
            monkeypatch.setenv(k, v)
        # the hub case in a process of its own: the hub libraries read HF_HOME when imported
        launch = run_cli if why == "offline hub" else invoke_cli
        result = launch(["traces", "import", *args, "--name", "bad", "--quiet"])
        assert_user_error(result, expected)
        assert not (tmp_path / "teacher_traces" / "bad").exists(), why


# ---------------------------------------------------------------------------------------------
# distill traces import


def test_import_writes_a_store_that_reads_like_generated_traces(files, tmp_path):
    out = tmp_path / "tt"
    result = invoke_cli(["traces", "import", str(files["openr1_math"]), "--name", "r1math",
                         "--out", str(out), "--quiet"])
    assert result.returncode == 0, result.stderr
    run = out / "r1math"
    manifest = read_manifest(run)
    assert manifest["complete"] and manifest["source_rows"] == 6
    # re-checked with math-verify against `answer`: the wrong ones; truncated ones by the filter
    assert manifest["totals"]["rejected"] == {"truncated": 12, "wrong": 6}
    assert manifest["totals"]["records"] == 6 and manifest["disagreed_with_dataset"] == 0
    table = read_table(run)
    assert table.column("correct").to_pylist() == [True] * 6
    assert set(table.column("predicted").to_pylist()) == {str(7 + 3 * i) for i in range(6)}
    # the trainer reads the import exactly as the source itself
    imported = read_traces([str(run)]).datasets[0]
    direct = read_traces([str(files["openr1_math"])]).datasets[0]
    assert [(t.id, t.prompt, t.reasoning, t.answer) for t in imported] == [
        (t.id, t.prompt, t.reasoning, t.answer) for t in direct]
    assert "Imported by `distill traces import`" in (run / "README.md").read_text()


def test_import_dedups_filters_and_resumes(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Question {i % 3}?"},
                          {"role": "assistant", "content": pub.think("same steps", "same")}]}
            for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "Mixed?"},
                              {"role": "assistant", "content": pub.think(
                                  "Это рассуждение is mixed with English words here", "ok")}]})
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decon = tmp_path / "bench.jsonl"
    decon.write_text(json.dumps({"problem": "Question 2?"}) + "\n")
    args = ["traces", "import", str(src), "--name", "d", "--out", str(tmp_path / "tt"),
            "--quiet", "--set", "output.rows_per_shard=2", "--set",
            f"filters.decontaminate=[{decon}]", "--set", "filters.decontam_ngram=2"]
    assert invoke_cli(args).returncode == 0
    m = read_manifest(tmp_path / "tt" / "d")
    assert m["totals"]["records"] == 2 and len(m["shards"]) == 4
    assert m["totals"]["rejected"] == {"duplicate": 2, "contaminated": 2, "language_mix": 1}
    # an interrupted import (the last two shards lost) resumes and ends the same
    first, totals = read_table(tmp_path / "tt" / "d").to_pylist(), m["totals"]
    m["shards"], m["complete"] = m["shards"][:2], False
    (tmp_path / "tt" / "d" / "manifest.json").write_text(json.dumps(m))
    assert invoke_cli(args).returncode == 0
    again = read_manifest(tmp_path / "tt" / "d")
    assert again["complete"] and again["totals"] == totals
    assert read_table(tmp_path / "tt" / "d").to_pylist() == first


def test_eval_scores_students_on_public_traces_by_nll(files, tmp_path):
    """kl.traces may be a public dataset: text-only traces give each student its NLL and top-1
    agreement on the teacher's completion tokens, computed here again from the logits."""
    import yaml

    import distill
    from distill.eval.evaluate import run_eval

    student = toy.qwen2_dir(tmp_path / "student")
    cfg = {"prompts": {"source": "synthetic", "synthetic": {"n": 2}},
           "models": [{"name": "s", "model": str(student)}],
           "protocol": {"n": 1, "max_new_tokens": 2, "greedy": False},
           "kl": {"traces": {"source": str(files["openthoughts3"]), "limit": 2},
                  "only_eval_prompts": False},
           "output": str(tmp_path / "out")}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    [scores] = [m["agreement"] for m in run_eval(path, progress=False)["models"]]
    model, tok = distill.load_pretrained(student)
    nll, hits, n = 0.0, 0, 0
    for t in read_traces([str(files["openthoughts3"])]).datasets[0][:2]:
        ids, mask = render_example(tok, t.prompt, t.reasoning, t.answer)
        logits = np.asarray(model(ids[None, :-1]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
            - logits.max(-1, keepdims=True)
        target, scored = ids[1:], mask[1:]
        nll -= logp[np.arange(len(target)), target][scored].sum()
        hits += (logits.argmax(-1) == target)[scored].sum()
        n += scored.sum()
    assert scores["traces"] == 2 and scores["tokens"] == n and "kl" not in scores
    assert scores["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert scores["top1_agreement"] == pytest.approx(hits / n)
    assert "| NLL of teacher traces (nats/token) |" in (tmp_path / "out" / "eval.md").read_text()


def test_the_import_benchmark_file_has_the_card_schema(tmp_path):
    """`python -m distill.bench.imports` measures on rows of OpenR1-Math's exact schema, two
    generations of four kept per row (right; right with a null finish reason but complete),
    two dropped (truncated; wrong)."""
    from distill.bench.imports import write_synthetic

    path = write_synthetic(tmp_path / "synthetic.parquet", rows=50, steps=2, chunk=20)
    assert pq.read_schema(path) == pub.OPENR1_SCHEMA
    traces = read_traces([str(path)]).datasets[0]
    assert len(traces) == 100 and {t.id.rsplit("#", 1)[1] for t in traces} == {"0", "3"}


def test_the_command_line_offers_every_preset():
    from click.testing import CliRunner

    from distill.cli import traces
    from distill.data.schemas import PRESETS, SCHEMAS

    [preset] = [p for p in traces.commands["import"].params if p.name == "preset"]
    assert list(preset.type.choices) == ["auto", *SCHEMAS]
    shown = " ".join(CliRunner().invoke(traces, ["import", "--help"]).output.split())
    for p in PRESETS.values():
        assert f"{p.name} ({p.datasets})" in shown


def test_the_command_line_names_every_benchmark():
    from click.testing import CliRunner

    from distill.cli import cli
    from distill.data.benchmarks import BENCHMARKS

    names = ", ".join(BENCHMARKS)
    for args in (["eval", "--help"], ["traces", "import", "--help"]):
        shown = " ".join(CliRunner().invoke(cli, args).output.split())
        assert f"({names}" in shown or f": {names} (" in shown, args


def test_a_local_benchmark_copy_decontaminates(tmp_path):
    """filters.decontaminate takes a benchmark's Parquet copy (its problem column)."""
    from distill.data.records import PromptRecord
    from distill.traces.filters import FiltersConfig, Judge

    bench = pub.math500(tmp_path / "math500.parquet")
    judge = Judge(FiltersConfig(decontaminate=(str(bench),), decontam_ngram=4))
    assert judge.is_contaminated(PromptRecord("a", "Quick: what is $5 + 6$? Show work."))
    assert not judge.is_contaminated(PromptRecord("b", "What is 9 plus 10?"))


def test_each_question_of_a_conversation_has_its_own_reference():
    from distill.data.schemas import conversation_turns

    messages = [
        {"role": "user", "content": "2 + 3?", "info": {"reference_answer": "5"}},
        {"role": "assistant", "content": pub.think("2 + 3 = 5", "\\boxed{5}")},
        {"role": "user", "content": "Now tell me a joke.", "info": {"reference_answer": None}},
        {"role": "assistant", "content": pub.think("a joke", "Why did...")}]
    first, second = conversation_turns(messages, drop_system=False)
    assert (first.reference, second.reference) == ("5", None)


def test_a_benchmark_problem_in_the_history_contaminates_later_turns(files):
    from distill.data.records import PromptRecord
    from distill.traces.filters import FiltersConfig, Judge

    judge = Judge(FiltersConfig(decontam_ngram=3))
    judge.add_eval_prompts(["What is 2 + 2?"])
    second = read_traces([str(files["mixture_of_thoughts"])]).datasets[0][-1]
    assert second.prompt[-1]["content"] == "And doubled?"
    assert judge.is_contaminated(PromptRecord(second.prompt_id, second.prompt))


def test_a_local_hub_snapshot_is_read_at_its_config_and_split(tmp_path):
    snap = tmp_path / "OpenR1-Math-220k"
    pub.openr1_math(snap / "data" / "train-00000-of-00001.parquet", n=2)
    pub.openr1_math(snap / "extended" / "train-00000-of-00001.parquet", n=3)
    pub.openr1_math(snap / "all" / "default-00000-of-00001.parquet", n=5)
    def count(**kw) -> int:
        return len(read_traces([TraceSource(source=str(snap), keep="all", **kw)]).datasets[0])

    assert count(config="default") == 8 and count(config="extended") == 12
    assert count(config="all", split="default") == 20
    with pytest.raises(DistillError, match=r"holds several configurations with a 'train' split "
                                           r"\(data, extended\); set config"):
        count()
    with pytest.raises(DistillError, match=r"no split 'test' \(splits: train\)"):
        count(config="extended", split="test")
    with pytest.raises(DistillError, match=r"no folder for config 'math' \(folders: all, data, "
                                           r"extended\)"):
        count(config="math")


def test_an_import_without_verdicts_trains_by_default(files, tmp_path):
    """OpenThoughts has no reference and no verdict: the import keeps what passed the filters,
    and its store says training should keep complete traces (not only verified ones)."""
    out = tmp_path / "tt"
    assert invoke_cli(["traces", "import", str(files["openthoughts"]), "--out", str(out),
                       "--quiet"]).returncode == 0
    run = out / "train-0"
    assert read_manifest(run)["default_keep"] == "complete"
    assert len(read_traces([str(run)]).datasets[0]) == 5


def test_import_refuses_names_that_are_not_one_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher_traces" / "keep-me").mkdir(parents=True)
    for name in ("..", ".", "a/b", " "):
        result = invoke_cli(["traces", "import", str(files["s1k"]), "--name", name,
                             "--overwrite"])
        assert_user_error(result, "must be one folder name")
    assert (tmp_path / "teacher_traces" / "keep-me").is_dir()
    result = invoke_cli(["traces", "import", str(files["s1k"]), "--set", "source.keep=all"])
    assert_user_error(result, "source.keep does not apply to an import")
