"""The rejection-sampling filters: every reason triggered and counted, dedup, decontamination."""

import json

import pytest
from pydantic import ValidationError

from distill.data.records import PromptRecord, Sample
from distill.errors import DistillError
from distill.traces.filters import FiltersConfig, Judge, foreign_script_fraction

PROMPT = PromptRecord("p1", "What is 6 times 7?", reference="42")

REASONING = (
    "We need the product of six and seven. Six times seven means adding six to itself seven "
    "times, which gives six, twelve, eighteen, twenty-four, thirty, thirty-six and forty-two. "
    "So the product is forty-two, and a quick check with seven times six agrees with it.")
OTHER_REASONING = (
    "Think of a rectangle with six rows and seven columns of dots. Counting the dots row by row "
    "uses the table of sevens: seven, fourteen, twenty-one, twenty-eight, thirty-five, forty-two. "
    "The rectangle therefore holds forty-two dots in total, which is the requested number.")


def sample(reasoning=REASONING, answer=r"The answer is $\boxed{42}$.", *, finish="stop",
           tokens=100, index=0, completion=None):
    """A completion as an R1 chat template yields it: `reasoning </think> answer`."""
    text = completion if completion is not None else f"{reasoning}\n</think>\n\n{answer}"
    return Sample(sample_index=index, completion=text, finish_reason=finish, prompt_tokens=10,
                  completion_tokens=tokens)


def test_accepts_a_good_sample():
    judge = Judge(FiltersConfig())
    v = judge.judge(PROMPT, sample())
    assert v.reason is None
    assert v.reasoning == REASONING
    assert v.answer == r"The answer is $\boxed{42}$."
    assert (v.predicted, v.correct) == ("42", True)
    assert judge.counts == {"accepted": 1}


@pytest.mark.parametrize(("cfg", "smp", "reason"), [
    ({}, sample(finish="length"), "truncated"),
    ({}, sample(completion=r"No think block, \boxed{42}"), "no_think"),
    ({}, sample(completion="<think>\nthinking and thinking"), "unclosed_think"),
    ({"max_completion_tokens": 50}, sample(tokens=51), "too_long"),
    ({}, sample(answer="  "), "empty_answer"),
    ({}, sample(answer="The answer is forty-two."), "no_answer"),
    ({}, sample(answer=r"\boxed{41}"), "wrong"),
])
def test_each_rejection_reason_is_counted(cfg, smp, reason):
    judge = Judge(FiltersConfig(**cfg))
    assert judge.judge(PROMPT, smp).reason == reason
    assert judge.counts == {reason: 1}


def test_checks_can_be_switched_off():
    judge = Judge(FiltersConfig(reject_truncated=False, require_think=False))
    assert judge.judge(PROMPT, sample(finish="length")).reason is None
    v = judge.judge(PROMPT, sample(completion=r"No think block, \boxed{42}"))
    assert (v.reason, v.reasoning, v.predicted) == (None, None, "42")
    # Without its close the think block has no answer part.
    assert judge.judge(PROMPT, sample(completion="<think>R")).reason == "empty_answer"


def test_answer_pattern_when_there_is_no_box():
    judge = Judge(FiltersConfig(answer_pattern=r"answer is (\S+?)\.?$"))
    v = judge.judge(PROMPT, sample(answer="So the answer is 42."))
    assert (v.reason, v.predicted, v.correct) == (None, "42", True)


def test_answer_is_read_after_think_only():
    judge = Judge(FiltersConfig())
    v = judge.judge(PROMPT, sample(reasoning=r"Maybe \boxed{42}?", answer="I am not sure."))
    assert (v.reason, v.predicted, v.correct) == ("no_answer", None, False)


def test_keep_all_keeps_wrong_answers_with_their_verdict():
    judge = Judge(FiltersConfig(keep="all"))
    wrong = judge.judge(PROMPT, sample(answer=r"\boxed{41}"))
    assert (wrong.reason, wrong.predicted, wrong.correct) == (None, "41", False)
    missing = judge.judge(PROMPT, sample(OTHER_REASONING, answer="No idea.", index=1))
    assert (missing.reason, missing.correct) == (None, False)
    assert judge.counts == {"accepted": 2}


def test_keep_complete_keeps_wrong_answers_but_not_truncated_ones():
    judge = Judge(FiltersConfig(keep="complete", reject_truncated=False))
    wrong = judge.judge(PROMPT, sample(answer=r"\boxed{41}"))
    assert (wrong.reason, wrong.correct) == (None, False)
    cut = judge.judge(PROMPT, sample(OTHER_REASONING, answer=r"\boxed{40}", finish="length",
                                     index=1))
    assert cut.reason == "truncated"


def test_no_reference_means_correct_is_none():
    judge = Judge(FiltersConfig())
    v = judge.judge(PromptRecord("open", "Write a haiku."), sample(answer="Autumn wind blows"))
    assert (v.reason, v.predicted, v.correct) == (None, None, None)


def test_server_split_reasoning():
    judge = Judge(FiltersConfig())
    smp = Sample(0, r"The answer is \boxed{42}.", "stop", 10, 100, reasoning=f"  {REASONING}\n")
    v = judge.judge(PROMPT, smp)
    assert (v.reason, v.reasoning, v.answer, v.correct) == (
        None, REASONING, r"The answer is \boxed{42}.", True)


def test_chat_prompt():
    prompt = PromptRecord("chat", [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What is 6 times 7?"}], "42")
    assert Judge(FiltersConfig()).judge(prompt, sample()).reason is None


# --- dedup -------------------------------------------------------------------------------------

def test_exact_duplicate_of_the_same_prompt_only():
    judge = Judge(FiltersConfig(dedup="exact"))
    assert judge.judge(PROMPT, sample(index=0)).reason is None
    assert judge.judge(PROMPT, sample(REASONING + "  ", index=1)).reason == "duplicate"
    other = PromptRecord("p2", "Compute 7 times 6.", reference="42")
    assert judge.judge(other, sample(index=0)).reason is None
    assert judge.counts == {"accepted": 2, "duplicate": 1}


# Reasoning of a realistic length (~300 words; R1 traces run to thousands): on short texts one
# changed word alters a large share of the 5-word shingles.
LONG_REASONING = " ".join(f"Step {i}: adding six to {6 * i} gives {6 * i + 6}." for i in range(40))
LONG_OTHER = " ".join(f"Row {i} of the grid holds seven dots, so far {7 * i + 7} dots."
                      for i in range(40))


def test_near_duplicate_catches_a_one_word_change_not_another_solution():
    judge = Judge(FiltersConfig())
    assert judge.judge(PROMPT, sample(LONG_REASONING, index=0)).reason is None
    one_word = LONG_REASONING.replace("Step 17: adding", "Step 17: summing")
    assert one_word != LONG_REASONING
    assert judge.judge(PROMPT, sample(one_word, index=1)).reason == "near_duplicate"
    assert judge.judge(PROMPT, sample(LONG_OTHER, index=2)).reason is None
    assert judge.counts == {"accepted": 2, "near_duplicate": 1}


def test_exact_dedup_misses_a_one_word_change():
    judge = Judge(FiltersConfig(dedup="exact"))
    judge.judge(PROMPT, sample(LONG_REASONING, index=0))
    one_word = LONG_REASONING.replace("Step 17: adding", "Step 17: summing")
    assert judge.judge(PROMPT, sample(one_word, index=1)).reason is None


def test_rejected_samples_are_not_remembered_for_dedup():
    judge = Judge(FiltersConfig())
    assert judge.judge(PROMPT, sample(answer=r"\boxed{41}")).reason == "wrong"
    assert judge.judge(PROMPT, sample(answer=r"\boxed{41}", index=1)).reason == "wrong"


def test_observe_makes_a_later_identical_sample_a_duplicate():
    judge = Judge(FiltersConfig())
    judge.observe(PROMPT.id, sample().completion)
    assert judge.counts == {}
    assert judge.judge(PROMPT, sample(index=1)).reason == "duplicate"
    assert judge.counts == {"duplicate": 1}


# --- decontamination ---------------------------------------------------------------------------

EVAL = "Find the number of ordered pairs of positive integers whose product is 2024."


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "evals" / "aime.jsonl"
    path.parent.mkdir()
    rows = [{"problem": EVAL}, {"question": "Unrelated short one"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_decontamination_catches_an_8gram_not_a_7gram(eval_file, monkeypatch):
    monkeypatch.chdir(eval_file.parents[1])  # a relative path is relative to the working directory
    judge = Judge(FiltersConfig(decontaminate=("evals/aime.jsonl",)))
    # "of ordered pairs of positive integers whose product" is 8 words of EVAL.
    leaked = PromptRecord("a", "Please count: of ordered pairs of positive integers whose product, ok")
    clean = PromptRecord("b", "Please count: of ordered pairs of positive integers whose sum, ok")
    assert judge.judge(leaked, sample()).reason == "contaminated"
    assert judge.judge(clean, sample()).reason is None
    assert judge.counts == {"contaminated": 1, "accepted": 1}


def test_decontamination_matches_short_prompts_whole(tmp_path):
    path = tmp_path / "evals.txt"
    path.write_text("What is 6 times 7?\n\nAnother eval prompt\n")
    judge = Judge(FiltersConfig(decontaminate=(str(path),)))
    assert judge.is_contaminated(PromptRecord("x", "what is 6 TIMES 7"))
    assert not judge.is_contaminated(PromptRecord("y", "So, what is 6 times 7?"))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.jsonl", None, "not found"),
    ("bad.jsonl", '{"prompt": "ok"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
    ("nofield.jsonl", '{"text": "hi"}\n', r"nofield.jsonl:1: needs a text 'prompt'"),
    ("evals.csv", "a,b\n", "must be .jsonl, .txt, .parquet or a save_to_disk folder"),
])
def test_decontamination_file_errors(tmp_path, name, content, message, monkeypatch):
    if content is not None:
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError, match=message):
        Judge(FiltersConfig(decontaminate=(name,)))


# --- language mixing ---------------------------------------------------------------------------

def test_language_mix_catches_chinese_sentences_in_english_reasoning():
    judge = Judge(FiltersConfig())
    mixed = REASONING + " 我们再检查一遍这个乘法的结果，确认答案是四十二没有问题。"
    assert judge.judge(PROMPT, sample(mixed)).reason == "language_mix"
    assert judge.counts == {"language_mix": 1}


def test_language_mix_allows_a_single_cjk_character():
    judge = Judge(FiltersConfig())
    assert judge.judge(PROMPT, sample(REASONING + " (答)")).reason is None


def test_language_mix_can_be_disabled():
    judge = Judge(FiltersConfig(max_foreign_script=None))
    mixed = REASONING + " 我们再检查一遍这个乘法的结果，确认答案是四十二没有问题。"
    assert judge.judge(PROMPT, sample(mixed)).reason is None


def test_foreign_script_ignores_math_and_variables():
    # Chinese reasoning with variables, LaTeX commands and Greek letters is not mixed.
    assert foreign_script_fraction(r"设 x 为正数，则 \frac{x}{2} 小于 x，且 θ 为角度。") == 0.0
    assert foreign_script_fraction("Let θ be the angle, so sin θ ≤ 1 for all x ∈ ℝ.") == 0.0
    assert foreign_script_fraction("Пусть x равно пяти. Then x is five.") > 0.3


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["Answer: (", "no group", "(a)(b)"])
def test_answer_pattern_is_validated(pattern):
    with pytest.raises(ValidationError, match="answer_pattern"):
        FiltersConfig(answer_pattern=pattern)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="dedupe"):
        FiltersConfig(dedupe="near")
