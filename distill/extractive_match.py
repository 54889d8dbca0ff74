"""lighteval's extractive match, as open-r1 evaluates with it: the answer a completion gives, read
by a priority list of regexes over the whole completion, and its comparison with the reference.

The rules are those of lighteval at d3da6b9b (the commit open-r1 1416fa0 pins, setup.py:59),
transcribed from src/lighteval/metrics/utils/extractive_match_utils.py there (cited below as
`emu.py:LINE`):

- math (lighteval's math_500 / aime24 metrics, metrics.py:373-404): LaTeX and plain-expression
  candidates, no fallback. Priorities, lowest first (`get_extraction_regexes`, emu.py:340-364,
  puts LaTeX before expressions at equal priority): 0 "final answer is X. I hope", 50 "final
  answer ... is X", 55 a `\\boxed{}` (alone or inside `$...$`), 100 "answer: X", 200 "answer ...
  X", 300 any LaTeX environment, any expression with an operator, any number
  (emu.py:100-159, 229-279);
- letters (GPQA's metric, metrics.py:873-889, `multilingual_extractive_match_metric` at
  dynamic_metrics.py:188): 0 "final answer is X. I hope", 50 "final answer ... is X", 100
  "answer: ... X", 150 "answer ... X", 200 X at the start of the text, 250 X set off by a space
  or the text's start, 300 any capital A-D (emu.py:283-337);
- the search (`extract_target_from_pred`, emu.py:516-585): priority by priority, the matches of
  one priority from the rightmost end (then the leftmost start), the first that parses wins; a
  priority with no parsable match gives way to the next.

Parsing: a LaTeX candidate goes through latex2sympy2_extended's `normalize_latex` with the pin's
config (emu.py:42-53; `\\boxed` read as its last one when the match is a bare `\\boxed{...}`,
emu.py:457-458) and `latex2sympy` (emu.py:370-375); up to six candidates joined by "and" / "or" /
"," make a set (emu.py:478-487). A number is read as a sympy Number (thousands separators dropped,
a percent divided by 100), an expression by sympy's `parse_expr` (emu.py:383-421). The pin used
latex2sympy2_extended 1.0.6; this uses the version math-verify 0.9.0 installs (1.11), whose
normalisation is the same for these rules except that the equation step (keep the last side of
`a = b = c`, deprecated in its `normalize_latex`) is applied here after it, as math-verify does.

Equality is math-verify's `verify` (where lighteval's `compare_gold_target` went on to live) at 6
decimal places. The reference is read as lighteval reads a gold: the same rules over
`$\\boxed{reference}$` (MATH-500's `answer` column is the last `\\boxed{}` of the `solution` the pin
reads its gold from). One quirk of the pin is not reproduced: its math pass@1 calls
`compare_gold_target(pred, gold, doc)` (PassAtK, src/lighteval/metrics/metrics_sample.py:1194),
so the precision it compares with is a Doc and any comparison that reaches float rounding fails
there (a boxed 0.5 against a gold of 1/2 counts wrong at the pin, right here).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from functools import lru_cache
from itertools import groupby

# ------------------------------------------------------------------------------------------------
# The candidate regexes (English literals of translation_literals.py:302-324 filled in)

_FULL_STOP, _COMMA, _COLON = r"[\.\.]", r"[,\,]", r"[:\:]"


@lru_cache(maxsize=1)
def _expr_regexes() -> list[tuple[re.Pattern[str], int]]:
    """emu.py:100-159 (ExprExtractionConfig, try_extract_without_anchor=True)."""
    number_re = (r"(?:"
                 r"(?P<integer1>-?\d{1,3}(?:[ ,]\d{3})+)(?P<decimal1>\.\d+)?|"
                 r"(?P<integer2>-?\d+)(?P<decimal2>[.,]\d+)|"
                 r"(?P<decimal3>\.\d+)|"
                 r"(?P<integer3>-?\d+)"
                 r")(?P<percent>\s*(?:%|[Pp]ercent|\s*[Pp]ercentage|\s*[Pp]ct))?")
    operators_re = r"\+\-\*\×\/\^\(\)\÷"
    all_expr_chars = r"[\d\.\s" + operators_re + r"]"
    expr_re = rf"(?P<expr>-?\(?-?\d{all_expr_chars}*[{operators_re}]{all_expr_chars}+\)?)"
    space_re = r"(?:\s|\ )"
    currency_units = re.escape("$€£¥₹₽₪₩₫฿₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₴₵₶₷₸₹₺₻₼₽₾₿")
    prefix = rf"(?:^|{space_re}|\=)(?:\*\*)?"
    suffix = rf"(?:\*\*)?(?:{_FULL_STOP}|{_COMMA}|{_COLON}|{space_re}|\)|\$|$)"
    expr_with_anchors = rf"(?:{prefix}{expr_re}{suffix})"
    number_with_anchors = rf"(?:{prefix}[{currency_units}]?{number_re})"
    expr_or_number = rf"(?:{expr_with_anchors}|{number_with_anchors})"
    answer = r"(?i:answer)"
    regexes = [
        (rf"(?i:final answer is)\:?\s*{expr_or_number}\.?\s?I hope", 0),
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?{expr_or_number}", 50),
        (rf"{answer}{_COLON}(?:.{{0,100}}=\s*|.{{0,50}}?){expr_or_number}(?!\s*=)", 100),
        (rf"{answer}(?:.{{0,100}}=\s*|.{{0,50}}?){expr_or_number}(?!\s*=)", 200),
        (expr_with_anchors, 300),
        (number_with_anchors, 300),
    ]
    return [(re.compile(p), priority) for p, priority in regexes]


def _latex_env(prefix: str = "", context: str = "plain") -> str:
    """`make_latex_env_pattern`, emu.py:162-225."""
    percent = rf"(?P<{prefix}percent>(?:\\?%|[Pp]ercent|[Pp]ercentage|[Pp]ct))"
    contents = [r"(?:[^$]|\$(?!\$))", r"(?:[^\\]|\\(?!\]))", r"(?:\\[$]|[^\n$])",
                r"(?:[^\\\n]|\\(?!\)))", r"[^\n\]\[]"]
    if context == "boxed":
        contents = [rf"{c}*?\\boxed{{{c}+?}}{c}*?" for c in contents]
    else:
        contents = [rf"{c}+?" for c in contents]
    dollar2, bracket2, dollar, paren, bracket = contents
    patterns = [
        rf"(?<!\\)\$\$(?P<{prefix}latexDisplayDollar>{dollar2})(?<!\\)\$\$",
        rf"(?<!\\)\\\[(?P<{prefix}latexDisplayBracket>{bracket2})(?<!\\)\\\]",
        rf"(?<!\\|\d)\$(?P<{prefix}latexInlineDollar>{dollar})(?<!\\)\$",
        rf"(?<!\\)\\\((?P<{prefix}latexInlineParenthesis>{paren})(?<!\\)\\\)",
        rf"\s\[(?P<{prefix}latexInlineBracket>{bracket})\]\s",
    ]
    if context == "plain":
        number = r"-?\d+(?:[.,]\d+)?"
        patterns.append(rf"(?P<{prefix}latexFraction>-?\\frac{{{number}}}{{{number}}})")
    return rf"(?:(?:{'|'.join(patterns)})\s*{percent}?)"


def _joined(context: str) -> str:
    """Up to six environments joined by "and" / "or" / "," (emu.py:233-240, 266-273)."""
    rest = "".join(rf"(?:\s*(?:and|or|,)\s*{_latex_env(f'next{i}_', context)})?"
                   for i in range(1, 6))
    return rf"(?:{_latex_env('first_', context)}{rest})"


@lru_cache(maxsize=1)
def _latex_regexes() -> list[tuple[re.Pattern[str], int]]:
    """emu.py:229-279 (LatexExtractionConfig defaults: without anchor, boxed priority 55)."""
    latex_re, answer = _joined("plain"), r"(?i:answer)"
    regexes = [
        (rf"(?i:final answer is)\:?\s*{latex_re}\.?\s?I hope", 0),
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?\s*{latex_re}", 50),
        (f"{answer}{_COLON}.{{0,50}}?{latex_re}", 100),
        (f"{answer}.{{0,50}}?{latex_re}", 200),
        (latex_re, 300),
        (_joined("boxed"), 55),
        (r"(?P<first_latexBoxed>\\boxed{.+})", 55),
    ]
    return [(re.compile(p, re.DOTALL), priority) for p, priority in regexes]


@lru_cache(maxsize=4)
def _letter_regexes(letters: str) -> list[tuple[re.Pattern[str], int]]:
    """emu.py:283-337 (IndicesExtractionConfig "NativeLetters", without anchor)."""
    indices = f"(?P<indices>{'|'.join(re.escape(c) for c in letters)})"
    suffix = rf"(?:\*\*)?(?:{_FULL_STOP}|{_COMMA}|{_COLON}|\ |$)"
    answer_re = rf"(^|\ )(?:\*\*)?{indices}{suffix}"
    answer = "(?i:answer)"
    regexes = [
        (rf"(?i:final answer is)\:?\s*{indices}\.?\s?I hope", 0),
        (rf"(?i:final answer.{{0,100}}?)\s+is\:?\s*{indices}", 50),
        (f"{answer}{_COLON}.{{0,50}}?{answer_re}", 100),
        (f"{answer}.{{0,50}}?{answer_re}", 150),
        (rf"^(?:\*\*)?{indices}{suffix}", 200),
        (answer_re, 250),
        (indices, 300),
    ]
    return [(re.compile(p), priority) for p, priority in regexes]


# ------------------------------------------------------------------------------------------------
# Parsing a candidate

# Seconds a candidate may take to parse (emu.py:521), where signal.alarm works (the main thread).
_TIMEOUT_S = 5


def _timed(fn, text: str, *args, **kwargs):
    """fn(text, ...) under math-verify's timeout in the main thread (as lighteval's `timeout`
    works only there); elsewhere, with no timeout to stop it, a text sympy might stall on
    (`distill.verify.may_stall`) is not parsed."""
    if threading.current_thread() is not threading.main_thread():
        from distill.verify import may_stall

        if may_stall(text):
            raise TimeoutError(f"not parsed off the main thread: {text[:40]}...")
        return fn(text, *args, **kwargs)
    from math_verify.utils import timeout

    return timeout(_TIMEOUT_S)(fn)(text, *args, **kwargs)


def _percent(number):
    import sympy

    return sympy.Mul(number, sympy.Rational(1, 100), evaluate=False)


def _parse_expr(match: re.Match):
    """(value or None, string) of an expression or number candidate (emu.py:383-417)."""
    from sympy import Number
    from sympy.parsing import parse_expr

    groups = match.groupdict()
    expr = groups.get("expr", "")
    integer = next((v for k, v in groups.items() if k.startswith("integer") and v), "")
    decimal = next((v for k, v in groups.items() if k.startswith("decimal") and v), "")
    if integer or decimal:
        integer = integer.translate(str.maketrans("", "", ", ")).lstrip("0") or "0"
        number_str = f"{integer}{decimal.replace(',', '.')}"
        try:
            number = Number(number_str)
        except Exception:  # sympy refuses it: no value, as at the pin
            return None, number_str
        return (_percent(number) if groups.get("percent") else number), number_str
    if expr:
        try:
            return _timed(parse_expr, expr.replace("\n", " ").replace("^", "**"),
                          evaluate=False), expr
        except Exception:  # sympy or the timeout: not parsable, as at the pin
            pass
    return None, expr


@lru_cache(maxsize=1)
def _normalization():
    """The pin's NormalizationConfig (emu.py:42-53), its equation step apart (see above)."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig

    return NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                               boxed="all", equations=False)


def _last_side(latex: str) -> str:
    """The equation step of the pin's normalisation: `a = b = c` -> `c` (not `a=1,b=2`)."""
    from latex2sympy2_extended.math_normalization import equation_split_regex

    if "," not in latex and ";" not in latex:
        parts = equation_split_regex.split(latex)
        if len(parts) > 2:
            return parts[-1]
    return latex


def _latex_value(latex: str):
    """latex2sympy as the pin calls it (emu.py:370-375)."""
    from latex2sympy2_extended.latex2sympy2 import latex2sympy
    from math_verify.grader import should_treat_as_complex

    return _timed(latex2sympy, latex, is_real=not should_treat_as_complex(latex),
                  convert_degrees=False, normalization_config=None)


def _parse_latex(match: re.Match):
    """(value or None, string) of a LaTeX candidate, several joined ones as a set
    (emu.py:426-490)."""
    from latex2sympy2_extended.latex2sympy2 import FiniteSet as L2SFiniteSet
    from latex2sympy2_extended.latex2sympy2 import normalize_latex
    from sympy import FiniteSet

    groups = match.groupdict()
    found = [next(((v, k) for k, v in groups.items() if k.startswith(f"{p}_latex") and v), None)
             for p in ["first"] + [f"next{i}" for i in range(1, 6)]]
    values, strings = [], []
    for latex, name in filter(None, found):
        head, kind = name.split("_")[0], name.split("_")[1]
        config = _normalization()
        if kind == "latexBoxed":
            config = dataclasses.replace(config, boxed="last")
        normalized = _last_side(normalize_latex(latex, config=config))
        strings.append(normalized)
        try:
            value = _latex_value(normalized)
            values.append(_percent(value) if groups.get(f"{head}_percent") else value)
        except Exception:  # latex2sympy or the timeout: not parsable, as at the pin
            values.append(None)
    if not values:
        return None, ""
    if len(values) > 1 and all(v is not None for v in values):
        elements = [a for v in values for a in (v.args if isinstance(v, FiniteSet) else (v,))]
        return L2SFiniteSet(*elements), " and ".join(strings)
    return values[0], strings[0]


# ------------------------------------------------------------------------------------------------
# The search and the public readers


@dataclasses.dataclass(frozen=True)
class Extracted:
    """An answer read from a text: `shown`, the string read (normalised LaTeX, the number, the
    expression, the letter); `value`, its parsed form (a sympy object, or the letter)."""

    shown: str
    value: object


def _search(text: str, candidates) -> Extracted | None:
    """`extract_target_from_pred` (emu.py:516-585), any_match: by priority, rightmost match
    first, the first that parses."""
    patterns = sorted(((pattern, parse, priority) for regexes, parse in candidates
                       for pattern, priority in regexes), key=lambda x: x[2])
    for _, group in groupby(patterns, key=lambda x: x[2]):
        matches = [(m, m.start(), m.end(), parse) for pattern, parse, _ in group
                   for m in pattern.finditer(text)]
        for m, _, _, parse in sorted(matches, key=lambda x: (x[2], -x[1]), reverse=True):
            value, shown = parse(m)
            if value is not None:
                return Extracted(shown, value)
    return None


def read_math(text: str) -> Extracted | None:
    """The math answer of a completion as lighteval reads it at open-r1's pin (the whole text;
    LaTeX before expressions at equal priority), or None."""
    return _search(text, [(_latex_regexes(), _parse_latex), (_expr_regexes(), _parse_expr)])


def read_letter(text: str, letters: str = "ABCD") -> str | None:
    """The choice letter of a completion as lighteval reads GPQA at open-r1's pin, down to any
    capital among `letters` anywhere in the text; None when there is none."""
    found = _search(text, [(_letter_regexes(letters),
                            lambda m: (m.group("indices"), m.group("indices")))])
    return None if found is None else found.shown


def math_equal(predicted: Extracted, reference: str) -> bool:
    """Whether a read answer equals the reference (read as `$\\boxed{reference}$`), by
    math-verify's `verify` at 6 decimal places; False when the reference does not parse."""
    from math_verify import verify

    gold = read_math(f"$\\boxed{{{reference}}}$")
    if gold is None:
        return False
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify([gold.value], [predicted.value], float_rounding=6,
                           timeout_seconds=timeout))
    except Exception:  # any failure of the comparison means "not shown equal", as at the pin
        return False


def judge_math(text: str, reference: str) -> tuple[str | None, bool]:
    """(the answer read, whether it equals the reference) of a completion, as open-r1 judges
    MATH-500 and AIME."""
    found = read_math(text)
    return (None, False) if found is None else (found.shown, math_equal(found, reference))
