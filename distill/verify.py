"""Answer checking: extract a completion's final answer (from the part after `</think>`, split by
`distill.chat.split_think`) and compare it with the reference.

Equivalence is math-verify's (numeric within 6 decimal places, symbolic, sets, intervals, tuples,
equations such as `x=5` vs `5`), after a normalisation of what it misses or gets wrong on bare
answers. What counts as equal (`answers_match`):

- thousands separators: `1,234`, `1{,}234` and `1\\,234` are 1234 — only commas followed by groups
  of exactly three digits, and never inside brackets, so `(1,2)` and `(1,234)` stay tuples and
  `1,5` is not 1.5;
- units and currency are dropped: `12 cm`, `12\\text{ cm}`, `5 cm^2`, `3 m/s`, `\\$5`, `5 dollars`,
  `€5` all equal the bare number (a trailing word of letters after a number is taken as a unit);
- percent: `50\\%` (also `50%`, `50 percent`) equals both 50 and 0.5, as in the R1 / Qwen
  evaluations; a bare 50 does not equal 0.5;
- degrees: `30^\\circ` / `30°` equal 30;
- text answers (a word of two or more letters that is not a LaTeX command, e.g. `yes`,
  `no solution`, `\\text{Alice}`) are compared as normalised strings (case, spacing, `\\text{}` and
  a final period ignored), never symbolically (so `yes` is not the product `y*e*s = s*e*y`);
- a multiple-choice letter in parentheses, `(B)`, is the letter `B`.

math-verify guards parsing with `signal.alarm`, which works only in the main thread; elsewhere (the
HTTP backend's and the server's worker threads) it runs without a timeout, so answers sympy could
stall on (over-long ones, huge powers and factorials, power towers) are compared as strings only.
"""

from __future__ import annotations

import re
import threading
from typing import Annotated

from math_verify import LatexExtractionConfig, parse, verify
from pydantic import AfterValidator

from distill.errors import DistillError


def check_answer_pattern(pattern: str | None) -> str | None:
    """A config's `answer_pattern`: a regex with exactly one capture group (the answer)."""
    if pattern is None:
        return None
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        raise ValueError(f"not a valid regex: {e}") from None
    if groups != 1:
        raise ValueError(f"needs exactly one capture group (the answer), has {groups}")
    return pattern


# the `answer_pattern` of generate's filters and of eval: used when a completion has no \boxed{}
AnswerPattern = Annotated[str | None, AfterValidator(check_answer_pattern)]

# Seconds math-verify may spend parsing or comparing one answer (main thread only).
_TIMEOUT_S = 5
# Longer answers are compared as strings: sympy can stall on huge expressions, with no timeout
# available off the main thread.
_MAX_SYMBOLIC_CHARS = 400


# ------------------------------------------------------------------------------------------------
# Answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == "{" and the index after it, or
    None when it never closes (nested groups and escaped braces handled)."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # skip \{ \} and any escaped character
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every well-formed `\\boxed{...}`, `\\fbox{...}` and `\\boxed TOKEN`, in order."""
    found = []
    for m in _BOX_RE.finditer(text):
        end = m.end()
        if end < len(text) and text[end] == "{":
            group = _braced(text, end)
            if group is not None:
                found.append(group[0])
        elif m.group(0) != m.group(0).rstrip():  # `\boxed 5`: a token after whitespace
            token = re.match(r"[^\s$]+", text[end:])
            if token:
                found.append(token.group(0))
    return found


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in `text`: the content of the last non-empty `\\boxed{...}` (or
    `\\fbox{...}`, or `\\boxed TOKEN`), nested braces handled; else, when `pattern` (a regex with
    one group) is given, its last match's group; else None. The result is stripped."""
    for content in reversed(_boxed_contents(text)):
        if content.strip():
            return content.strip()
    if pattern is None:
        return None
    try:
        matches = list(re.finditer(pattern, text))
    except re.error as e:
        raise DistillError(f"answer_pattern {pattern!r} is not a valid regex: {e}") from None
    for m in reversed(matches):
        group = m.group(1) if m.groups() else m.group(0)
        if group and group.strip():
            return group.strip()
    return None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The multiple-choice letter a completion ends on: the last, by position, of "Answer: X",
    `\\boxed{X}` and "answer is X" (markdown bold, `$X$`, `(X)`, `\\text{X}`, `\\mathrm{(X)}` and
    the like around the letter allowed); None when there is none. Letters elsewhere in the prose
    ("A) ..." while weighing options, "option B seems") are not answers."""
    one = f"[{re.escape(letters)}]"
    wrapper = r"(?:\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{)?"
    letter = rf"[\s*$]*\(?\s*{wrapper}\s*\(?\s*({one})\s*\)?(?![A-Za-z])"
    found = [(m.start(1), m.group(1)) for pattern in (rf"(?i:answer)\s*\**\s*:\s*\**{letter}",
                                                      rf"(?i:answer\s+is)\s*:?\s*\**{letter}")
             for m in re.finditer(pattern, text)]
    for m in _BOX_RE.finditer(text):
        end = m.end()
        group = _braced(text, end) if end < len(text) and text[end] == "{" else None
        if group is not None:
            inner = re.fullmatch(rf"\s*\(?\s*{wrapper}\s*\(?\s*({one})\s*\)?\s*\}}?\s*\)?\s*",
                                 group[0])
            if inner:
                found.append((end, inner.group(1)))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------------
# Normalisation

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SEPARATOR_RE = re.compile(r"(?<![\d.])(\d{1,3})((?:(?:,|\{,\}|\\,)\d{3})+)(?![\d])")
_CURRENCY_RE = re.compile(r"^(?:\\\$|\$|€|£|¥|\\euro\s*|\\pounds\s*|USD\s*|EUR\s*)\s*")
# A trailing unit after a number or a closing brace, set off by a space (or `\,`): words of two or
# more letters, or one of a few one-letter units, each with an optional power and `/word`.
# Letters only, so `\pi` and `\sqrt{2}` are never units; `2x` and `2 x` keep their variable.
_UNIT_WORD = r"(?:[A-Za-z]{2,}|[mgshLKJNWV])(?:\^\{?\d\}?)?(?:/[A-Za-z]+(?:\^\{?\d\}?)?)?"
_UNIT_RE = re.compile(rf"(?<=[\d}}])(?:\s|\\[,;! ])+{_UNIT_WORD}(?:\s+{_UNIT_WORD})*\.?$")
_PERCENT_RE = re.compile(r"(?<!\\)%|\s*\bpercent\b")
_PLAIN_TEXT_RE = re.compile(r"^[A-Za-z\s.,;:!?'\"-]*[A-Za-z]{2}[A-Za-z\s.,;:!?'\"-]*$")
# Words of four or more letters that are not LaTeX commands mark text; a few function names don't.
_LONG_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{4,}")
_MATH_WORDS = {"sqrt", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "infty", "frac"}
_CHOICE_RE = re.compile(r"^\(([A-Za-z])\)$")
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _unwrap(s: str) -> str:
    """Strip math delimiters, a whole-answer `\\boxed{}`, `\\text{}`-like wrappers, a final period."""
    s = s.strip()
    for left, right in _WRAPPERS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)].strip()
            break
    boxed = _boxed_contents(s)
    if len(boxed) == 1 and _BOX_RE.match(s):
        s = boxed[0].strip()
    s = _TEXT_CMD_RE.sub(lambda m: f" {m.group(1).strip()} ", s)
    return s.strip().rstrip(".").strip()


def normalize_answer(s: str) -> str:
    """The answer as math-verify should see it: delimiters, `\\text{}`, currency, units and
    thousands separators removed, percent as `\\%`, degrees as `^\\circ`, Unicode minus and π
    spelled in LaTeX."""
    s = _unwrap(s)
    s = s.replace("\u2212", "-").replace("π", "\\pi ").replace("°", "^\\circ")
    s = _CURRENCY_RE.sub("", s)
    s = re.sub(r"\s*(?:dollars?|cents?|euros?)\s*$", "", s) if re.search(r"\d", s) else s
    s = _PERCENT_RE.sub(r"\\%", s)
    if not re.search(r"[(\[]|\\\{|\\langle", s):  # tuples, intervals, sets keep their commas
        s = _SEPARATOR_RE.sub(lambda m: m.group(1) + re.sub(r"\D", "", m.group(2)), s)
    s = _UNIT_RE.sub("", s).strip()
    choice = _CHOICE_RE.match(s)
    return choice.group(1) if choice else s


def _canonical_text(s: str) -> str:
    """A string for plain equality: casefolded, no whitespace, no final period."""
    return re.sub(r"\s+", "", s.casefold()).rstrip(".")


def _is_text(s: str) -> bool:
    """Whether a normalised answer is words (`yes`, `no solution`, `Route 66`) rather than
    mathematics (`2xy`, `\\sin x`): letters and punctuation only, or a word of four or more letters
    that is not a LaTeX command or a function name."""
    if _PLAIN_TEXT_RE.match(s):
        return True
    return any(w.lower() not in _MATH_WORDS for w in _LONG_WORD_RE.findall(s))


# ------------------------------------------------------------------------------------------------
# Comparison

_LATEX = [LatexExtractionConfig(boxed_match_priority=0)]
_INTEGER_RE = re.compile(r"^[+-]?\d{1,30}$")


def _timeout() -> int | None:
    """math-verify's timeout, usable only where signal.alarm is: the main thread."""
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def may_stall(s: str) -> bool:
    """Whether sympy might stall on `s` (no timeout exists off the main thread): longer than
    `_MAX_SYMBOLIC_CHARS`, a power or factorial next to a six-digit literal (`10^{1234567}`,
    `123456!`), or a tower (`10^{10^{10}}`)."""
    if len(s) > _MAX_SYMBOLIC_CHARS:
        return True
    if re.search(r"\^|\*\*|!", s) and re.search(r"\d{6,}", s):
        return True
    for m in re.finditer(r"\^\s*\{", s):
        group = _braced(s, m.end() - 1)
        if group is None or "^" in group[0]:
            return True
    return False


def _symbolic_match(predicted: str, reference: str) -> bool:
    """math-verify's equivalence of two bare LaTeX answers; False on any failure."""
    timeout = _timeout()
    try:
        gold = parse(f"${reference}$", extraction_config=_LATEX, parsing_timeout=timeout)
        pred = parse(f"${predicted}$", extraction_config=_LATEX, parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify / sympy failures of any kind mean "not shown equal"
        return False


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Whether a predicted final answer equals the reference (see the module docstring for what
    counts as equal). Never raises: an unparsable input is simply not a match."""
    if predicted is None or reference is None:
        return False
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    if not pred or not ref:
        return False
    if _is_text(pred) or _is_text(ref):
        return _canonical_text(pred) == _canonical_text(ref)
    pred_flat, ref_flat = re.sub(r"\s+", "", pred), re.sub(r"\s+", "", ref)
    if pred_flat == ref_flat:
        return True
    if _INTEGER_RE.match(pred_flat) and _INTEGER_RE.match(ref_flat):
        return int(pred_flat) == int(ref_flat)  # exact; sympy would take ~7 ms to say so
    if may_stall(pred) or may_stall(ref):
        return False
    return _symbolic_match(pred, ref)
