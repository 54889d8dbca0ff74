"""Prompt sources: every file format, column mapping, chat prompts, templates, the held-out split,
the synthetic arithmetic family, and one clear line for each kind of bad input."""

import json
import logging
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config import validate
from distill.data.prompts import (
    PromptsConfig,
    SyntheticConfig,
    is_heldout,
    load_prompts,
    prompt_hash_id,
)
from distill.data.synthetic import (
    BOXED_INSTRUCTION,
    arithmetic_problems,
    check,
    final_answer,
    solution_reasoning,
)
from distill.errors import DistillError

ROWS = [
    {"id": "q1", "prompt": "What is 2 + 3?", "answer": "5"},
    {"id": "q2", "prompt": "Name a prime above 10.", "answer": "11"},
    {"id": "q3", "prompt": "Say \"hi\", then a comma, please", "answer": "hi,"},
    {"id": "q4", "prompt": "Ünïcode: π ≈ ?", "answer": "3.14"},
]
EXPECTED = [(r["id"], r["prompt"], r["answer"]) for r in ROWS]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_hf_disk(path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"data.jsonl": write_jsonl, "data.csv": write_csv, "data.parquet": write_parquet,
           "saved_ds": write_hf_disk}


def triples(records):
    return [(r.id, r.prompt, r.reference) for r in records]


def load(source, **kw):
    return load_prompts(PromptsConfig(source=str(source), columns=kw.pop("columns", {"id": "id"}),
                                      **kw))


def error_line(source, **kw) -> str:
    with pytest.raises(DistillError) as e:
        load(source, **kw)
    assert "\n" not in str(e.value), "errors are one line"
    return str(e.value)


# --- formats --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_gives_the_same_records(tmp_path, name, monkeypatch):
    WRITERS[name](tmp_path / name, ROWS)
    monkeypatch.chdir(tmp_path)  # auto-detected, from a path relative to the working directory
    assert triples(load(name)) == EXPECTED
    fmt = {"data.jsonl": "jsonl", "data.csv": "csv", "data.parquet": "parquet"}.get(name, "hf_disk")
    assert triples(load(tmp_path / name, format=fmt)) == EXPECTED


def test_saved_dataset_dict_reads_the_configured_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert triples(load(tmp_path / "dd", hub_split="test")) == EXPECTED[2:]
    msg = error_line(tmp_path / "dd", hub_split="validation")
    assert "'validation'" in msg and "train" in msg and "test" in msg


def test_column_mapping_and_numbers_from_parquet(tmp_path):
    rows = [{"uid": 7, "question": "1 + 1?", "solution": 2, "extra": "ignored"},
            {"uid": 8, "question": "Half of 3?", "solution": 1.5, "extra": "x"},
            {"uid": 9, "question": "Unknown?", "solution": None, "extra": "y"}]
    path = write_parquet(tmp_path / "q.parquet", rows)
    cols = {"prompt": "question", "reference": "solution", "id": "uid"}
    assert triples(load(path, columns=cols)) == [("7", "1 + 1?", "2"), ("8", "Half of 3?", "1.5"),
                                                 ("9", "Unknown?", None)]


def test_no_reference_column_needs_reference_null(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi"}])
    msg = error_line(path)
    assert "missing column 'answer'" in msg and str(path) in msg and "'prompt'" in msg
    assert triples(load(path, columns={"id": "id", "reference": None})) == [("a", "hi", None)]


def test_hashed_ids_are_stable_and_ignore_the_template(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]}
                                              for r in ROWS])
    plain = load(path, columns={})
    templated = load(path, columns={}, template="Q: {prompt}")
    assert [r.id for r in plain] == [r.id for r in templated]
    assert all(re.fullmatch(r"p-[0-9a-f]{16}", r.id) for r in plain)
    assert len({r.id for r in plain}) == len(ROWS)
    # the same prompt text gives the same id from any format
    other = write_csv(tmp_path / "p.csv", [{"prompt": r["prompt"], "answer": r["answer"]}
                                           for r in ROWS])
    assert [r.id for r in load(other, columns={})] == [r.id for r in plain]
    assert plain[0].id == prompt_hash_id(ROWS[0]["prompt"]) != prompt_hash_id("What is 2 + 4?")


# --- chat prompts and templates -------------------------------------------------------------


def test_chat_prompts_from_jsonl_and_parquet(tmp_path):
    rows = [{"id": "c1", "prompt": CHAT, "answer": "4"}]
    for path in (write_jsonl(tmp_path / "c.jsonl", rows),
                 write_parquet(tmp_path / "c.parquet", rows)):
        (rec,) = load(path, template="{prompt}\n\n" + BOXED_INSTRUCTION)
        assert rec.prompt == CHAT, "the template is not applied to chat prompts"
        assert rec.messages() == CHAT and rec.reference == "4"


def test_template_applies_to_text_prompts_only(tmp_path):
    rows = [{"id": "t", "prompt": "What is 6 * 7?", "answer": "42"},
            {"id": "c", "prompt": CHAT, "answer": "4"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    text, chat = load(path, template="{prompt}\n\n" + BOXED_INSTRUCTION)
    assert text.prompt == ("What is 6 * 7?\n\nPlease reason step by step, and put your final "
                           "answer within \\boxed{}.")
    assert chat.prompt == CHAT


def test_template_must_mark_the_prompt():
    with pytest.raises(DistillError, match=r"run.yaml: template: .*\{prompt\}"):
        validate(PromptsConfig, {"source": "x.jsonl", "template": "no marker"}, "run.yaml")


# --- held-out split -------------------------------------------------------------------------


def test_heldout_is_stable_and_close_to_the_fraction():
    ids = [f"id-{i}" for i in range(2000)]
    held = {i for i in ids if is_heldout(i, 0.2)}
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == {i for i in reversed(ids) if is_heldout(i, 0.2)}
    assert not any(is_heldout(i, 0.0) for i in ids)
    # a larger fraction holds out a superset: growing the held-out set never moves a prompt back
    assert held <= {i for i in ids if is_heldout(i, 0.5)}


def test_train_and_heldout_partition_the_prompts_in_any_order(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "answer": str(i)} for i in range(200)]
    fwd = write_jsonl(tmp_path / "fwd.jsonl", rows)
    rev = write_jsonl(tmp_path / "rev.jsonl", rows[::-1])
    split = {s: {r.id for r in load(fwd, split=s, heldout_fraction=0.3)}
             for s in ("all", "train", "heldout")}
    assert split["train"] | split["heldout"] == split["all"] and len(split["all"]) == 200
    assert not split["train"] & split["heldout"] and split["heldout"]
    assert {r.id for r in load(rev, split="heldout", heldout_fraction=0.3)} == split["heldout"]


def test_limit_applies_after_the_split(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "answer": str(i)} for i in range(50)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    heldout = load(path, split="heldout", heldout_fraction=0.5)
    assert [r.id for r in load(path, split="heldout", heldout_fraction=0.5, limit=3)] == [
        r.id for r in heldout[:3]]


def test_empty_split_says_why(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    msg = error_line(path, split="heldout")
    assert "no prompts left after split='heldout'" in msg and "heldout_fraction=0.0" in msg


# --- synthetic ------------------------------------------------------------------------------


def evaluate(steps):
    """Re-evaluate "a op b = c" steps independently of the library; returns the last c."""
    value = None
    for step in steps:
        a, op, b, c = re.fullmatch(r"(\d+) ?([-+*]) ?(\d+) ?= ?(\d+)", step).groups()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value, f"{step} does not continue the chain"
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], f"{step} is wrong"
        assert c >= 0
        value = c
    return value


@pytest.mark.parametrize("style", ["words", "compact"])
def test_synthetic_problems_are_exact_and_seeded(style):
    problems = arithmetic_problems(300, seed=3, min_steps=2, max_steps=4, style=style)
    assert problems == arithmetic_problems(300, seed=3, style=style)
    assert problems[:40] == arithmetic_problems(40, seed=3, style=style), "prefix-stable in n"
    assert problems != arithmetic_problems(300, seed=4, style=style)
    assert len({p.id for p in problems}) == 300 and problems[5].id == "arith-3-5"
    for p in problems:
        assert str(evaluate(p.steps)) == p.answer and check(p)
        assert p.difficulty == len(p.steps) and 2 <= p.difficulty <= 4
        assert solution_reasoning(p) == "\n".join(p.steps)
    assert {p.difficulty for p in problems} == {2, 3, 4}
    ops = {op for p in problems for s in p.steps for op in "+-*" if f"{op}" in s}
    assert ops == {"+", "-", "*"}


def test_both_styles_share_the_chain_and_differ_in_wording():
    words = arithmetic_problems(20, seed=1, style="words")
    compact = arithmetic_problems(20, seed=1, style="compact")
    for w, c in zip(words, compact, strict=True):
        assert w.answer == c.answer and [s.replace(" ", "") for s in w.steps] == list(c.steps)
        assert w.question.endswith("have now?") and f"has {c.question.split()[0]} " in w.question
        assert re.fullmatch(r"\d( [-+*]\d)+", c.question)
        assert final_answer(w) == f"The answer is \\boxed{{{w.answer}}}."
        assert final_answer(c) == f"\\boxed{{{c.answer}}}"
    assert len({w.question.split()[0] for w in words}) > 2, "names vary"


def test_compact_three_step_problems_are_about_40_characters():
    problems = arithmetic_problems(200, seed=0, min_steps=3, max_steps=3, style="compact")
    lengths = [len("\n".join([p.question, solution_reasoning(p), final_answer(p)]))
               for p in problems]
    assert 35 <= sum(lengths) / len(lengths) <= 45 and max(lengths) <= 50


def test_check_rejects_a_wrong_answer():
    import dataclasses

    p = arithmetic_problems(1, style="compact")[0]
    assert not check(dataclasses.replace(p, answer=str(int(p.answer) + 1)))
    assert not check(dataclasses.replace(p, question=p.question + " +1"))


def test_synthetic_source():
    cfg = PromptsConfig(source="synthetic", template="{prompt}\n" + BOXED_INSTRUCTION,
                        synthetic=SyntheticConfig(n=12, seed=2, min_steps=3, max_steps=3,
                                                  style="compact"))
    records = load_prompts(cfg)
    problems = arithmetic_problems(12, seed=2, min_steps=3, max_steps=3, style="compact")
    assert [(r.id, r.reference) for r in records] == [(p.id, p.answer) for p in problems]
    assert records[0].prompt == problems[0].question + "\n" + BOXED_INSTRUCTION
    assert records[0].meta == {"difficulty": 3, "source": "synthetic"}
    held = load_prompts(cfg.model_copy(update={"split": "heldout", "heldout_fraction": 0.5}))
    assert {r.id for r in held} == {p.id for p in problems if is_heldout(p.id, 0.5)}


def test_synthetic_config_checks_the_step_range():
    with pytest.raises(DistillError, match=r"run.yaml: synthetic: .*min_steps"):
        validate(PromptsConfig, {"source": "synthetic",
                                 "synthetic": {"min_steps": 5, "max_steps": 3}}, "run.yaml")


# --- bad input ------------------------------------------------------------------------------


def test_missing_files_and_unknown_sources(tmp_path, monkeypatch):
    assert "not found" in error_line(tmp_path / "nope.jsonl") and "nope.jsonl" in error_line(
        tmp_path / "nope.jsonl")
    monkeypatch.chdir(tmp_path)
    assert f"not found: {tmp_path / 'nope'}" in error_line("./nope")
    assert "not found" in error_line(tmp_path / "nope", format="parquet")
    (tmp_path / "p.txt").write_text("hello\n")
    assert "cannot tell the format" in error_line(tmp_path / "p.txt")
    (tmp_path / "folder").mkdir()
    assert "not a dataset saved with save_to_disk" in error_line(tmp_path / "folder")
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert "cannot read as parquet" in error_line(tmp_path / "bad.parquet")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.csv", ""),
                                          ("e.csv", "id,prompt,answer\n")])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    msg = error_line(tmp_path / name)
    assert str(tmp_path / name) in msg and "no prompts" in msg


def test_empty_parquet(tmp_path):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("answer", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "e.parquet")
    assert "empty file" in error_line(tmp_path / "e.parquet")


@pytest.mark.parametrize("name", list(WRITERS))
def test_missing_column_names_it_and_the_file(tmp_path, name):
    WRITERS[name](tmp_path / name, ROWS)
    msg = error_line(tmp_path / name, columns={"prompt": "question", "id": "id"})
    assert "missing column 'question'" in msg and str(tmp_path / name) in msg
    assert "'prompt'" in msg and "'answer'" in msg, "the available columns are listed"


def broken_jsonl(tmp_path):
    lines = [json.dumps(ROWS[0]), '{"id": "q2", "prompt": "oops",', json.dumps(ROWS[2]),
             "[1, 2]", json.dumps({"id": "q5", "prompt": "", "answer": "0"}),
             json.dumps({"id": "q6", "prompt": 12, "answer": "0"}),
             json.dumps({"id": "q7", "answer": "0"}), json.dumps(ROWS[3])]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_jsonl_fails_with_its_line_number(tmp_path):
    path = broken_jsonl(tmp_path)
    msg = error_line(path)
    assert msg.startswith(f"{path}:2: invalid JSON (") and "on_bad_row" in msg


def test_skip_mode_skips_bad_rows_and_keeps_the_rest(tmp_path, caplog):
    path = broken_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING, logger="distill.data.prompts"):
        records = load(path, on_bad_row="skip")
    assert triples(records) == [EXPECTED[0], EXPECTED[2], EXPECTED[3]]
    text = caplog.text
    assert f"{path}:2: invalid JSON" in text and f"{path}:4: expected a JSON object" in text
    assert f"{path}:5: empty prompt" in text and f"{path}:6: prompt in column" in text
    assert f"{path}:7: no prompt" in text and "skipped 5 bad row(s)" in text


@pytest.mark.parametrize("content,line", [
    ('{"id": "a", "prompt": "ok", "answer": "1"}\n{"id": "b", "prompt": "  ", "answer": "1"}\n', 2),
    ('{"id": "a", "prompt": [{"role": "user"}], "answer": "1"}\n', 1),
    ('{"id": "a", "prompt": [], "answer": "1"}\n', 1),
    ('{"id": null, "prompt": "x", "answer": "1"}\n', 1),
])
def test_bad_jsonl_rows_name_their_line(tmp_path, content, line):
    (tmp_path / "b.jsonl").write_text(content)
    assert error_line(tmp_path / "b.jsonl").startswith(f"{tmp_path / 'b.jsonl'}:{line}: ")


def test_bad_rows_in_csv_and_parquet_are_located(tmp_path):
    rows = [dict(ROWS[0]), {"id": "q2", "prompt": "", "answer": "1"}, dict(ROWS[2])]
    csv_path = write_csv(tmp_path / "b.csv", rows)
    assert error_line(csv_path).startswith(f"{csv_path}:3: empty prompt")  # line 1 is the header
    pq_path = write_parquet(tmp_path / "b.parquet", rows)
    assert error_line(pq_path).startswith(f"{pq_path}: row 1: empty prompt")
    assert triples(load(pq_path, on_bad_row="skip")) == [EXPECTED[0], EXPECTED[2]]


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], dict(ROWS[2], id="q1")])
    msg = error_line(path)
    assert msg.startswith(f"{path}:3: duplicate prompt id 'q1'") and f"{path}:1" in msg
    assert triples(load(path, on_bad_row="skip")) == EXPECTED[:2]
    # identical prompts without an id column hash to the same id
    same = write_jsonl(tmp_path / "s.jsonl", [ROWS[0], ROWS[0]])
    assert "duplicate prompt id 'p-" in error_line(same, columns={})


def test_all_rows_bad_in_skip_mode(tmp_path):
    (tmp_path / "x.jsonl").write_text("not json\n{also not\n")
    msg = error_line(tmp_path / "x.jsonl", on_bad_row="skip")
    assert "no prompts left" in msg and "2 row(s) were bad" in msg


def test_unreachable_hub_dataset_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    msg = error_line("distill-test/no-such-dataset-0000", columns={})
    assert msg.startswith("cannot load hub dataset 'distill-test/no-such-dataset-0000' split "
                          "'train': offline (HF_HUB_OFFLINE=1) and not in the local cache")
    assert msg.endswith("(no local file or folder of that name either)")
