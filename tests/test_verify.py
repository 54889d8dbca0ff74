"""Answer checking: think-block splitting, final-answer extraction, answer equivalence."""

import threading

import pytest

from distill.chat import split_think
from distill.errors import DistillError
from distill.verify import answers_match, extract_answer

# (predicted, reference, expected)
PAIRS = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    ("1/2", "0.5", True),
    (r"\dfrac{1}{2}", "1/2", True),
    (r"\tfrac{3}{4}", "0.75", True),
    (r"\frac12", "0.5", True),
    ("0.50", "0.5", True),
    ("2", "2.0", True),
    ("1.5", r"\frac{3}{2}", True),
    ("0.333333", "1/3", True),
    ("1/3", "0.33", False),
    (r"-\frac{1}{2}", "-0.5", True),
    # LaTeX and symbolic equivalence
    (r"\sqrt{2}", "2^{1/2}", True),
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"\frac{\sqrt{3}}{2}", "0.866025", True),
    (r"2\pi", r"2 \pi", True),
    ("π/2", r"\frac{\pi}{2}", True),
    ("3.14", r"\pi", False),
    ("x^2+2x+1", "(x+1)^2", True),
    ("2xy", "2yx", True),
    ("x=5", "5", True),
    ("10^{3}", "1000", True),
    (r"$\frac{1}{2}$", "0.5", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    # units, currency, percent, degrees
    ("12 cm", "12", True),
    (r"12\text{ cm}", "12", True),
    (r"12\,\text{cm}", "12", True),
    ("5 cm^2", "5", True),
    ("3 m/s", "3", True),
    ("12 apples", "12", True),
    (r"\$5", "5", True),
    ("$5", "5", True),
    ("5 dollars", "5", True),
    ("€20", "20", True),
    (r"50\%", "50", True),
    ("50%", "0.5", True),
    ("50 percent", "50", True),
    ("0.5", "50", False),
    (r"30^\circ", "30", True),
    ("30°", "30", True),
    ("2x", "2", False),
    # thousands separators (and tuples that must stay tuples)
    ("1,234", "1234", True),
    ("1,234,567", "1234567", True),
    ("1{,}234", "1234", True),
    (r"1\,234", "1234", True),
    (r"\$1,000", "1000", True),
    ("1,000.50", "1000.5", True),
    ("1,234", "1.234", False),
    ("1,5", "1.5", False),
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "12", False),
    ("(1,234)", "1234", False),
    # negatives
    ("-3", "-3", True),
    ("−5", "-5", True),
    ("-5", "5", False),
    # intervals and sets
    ("[1,2)", "[1,2)", True),
    ("[1,2)", "(1,2)", False),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("2, 3", "3, 2", True),
    # text and multiple choice
    ("yes", "Yes", True),
    ("yes", "no", False),
    ("sey", "yes", False),
    (r"\text{No solution}", "no solution", True),
    ("Route 66", "Route 67", False),
    (r"\text{(A)}", "A", True),
    ("(B)", "A", False),
    # wrong answers
    ("12", "21", False),
    ("1e3", "1000", False),
    # unparsable input: False, never an exception
    ("", "5", False),
    ("}}{{", "5", False),
    (r"\frac{", "1", False),
    ("10^{10^{10}}", "1", False),
]


@pytest.mark.parametrize(("predicted", "reference", "expected"), PAIRS)
def test_answers_match_table(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_answers_match_none():
    assert answers_match(None, "5") is False
    assert answers_match("5", None) is False


def test_answers_match_in_a_worker_thread():
    # math-verify's default timeout uses signal.alarm, which raises outside the main thread.
    results, errors = {}, []

    def work():
        try:
            results["frac"] = answers_match(r"\frac{1}{2}", "0.5")
            results["wrong"] = answers_match("12", "21")
        except Exception as e:  # the assertion below reports it
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert errors == []
    assert results == {"frac": True, "wrong": False}


# --- extraction --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    (r"so the answer is $\boxed{42}$.", "42"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{3} and a broken \boxed{4", "3"),
    (r"\boxed{ } then nothing", None),
    ("no box here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_pattern():
    text = "Answer: 12\nsome more\nAnswer: 13"
    assert extract_answer(text, r"Answer:\s*(\S+)") == "13"
    assert extract_answer(r"Answer: 13 \boxed{14}", r"Answer:\s*(\S+)") == "14"  # box first
    assert extract_answer("nothing", r"Answer:\s*(\S+)") is None
    with pytest.raises(DistillError, match="answer_pattern"):
        extract_answer("x", "Answer: (")


# --- think blocks ------------------------------------------------------------------------------

def test_split_think_full_block():
    s = split_think("<think>\nR\n</think>\n\nA")
    assert (s.reasoning, s.answer, s.opened, s.closed) == ("R", "A", True, True)


def test_split_think_opened_by_the_prompt():
    # R1 chat templates end the prompt with "<think>\n": the completion only closes the block.
    s = split_think("reasoning here\n</think>\n\nThe answer is 4.")
    assert (s.reasoning, s.answer, s.opened, s.closed) == (
        "reasoning here", "The answer is 4.", True, True)


def test_split_think_unclosed():
    s = split_think("<think>\nstill thinking")
    assert (s.reasoning, s.answer, s.opened, s.closed) == ("still thinking", "", True, False)


def test_split_think_no_tags():
    s = split_think("  just an answer \n")
    assert (s.reasoning, s.answer, s.opened, s.closed) == (None, "just an answer", False, False)


def test_split_think_empty_answer():
    s = split_think("<think>R</think>   ")
    assert (s.reasoning, s.answer, s.closed) == ("R", "", True)
