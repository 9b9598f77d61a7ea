"""Final-answer extraction and answer checking, pluggable per dataset type.

A checker does two things: `extract(response) -> str | None` finds the answer a response commits to, and
`equal(extracted, gold) -> bool` decides whether it matches the gold answer. Built-ins, registered by name
through the same `register_checker` seam that third-party checkers use:

- `math`: equivalence by Hugging Face's math-verify (LaTeX and plain forms, fractions vs decimals,
  symbolic equality, sets and intervals, units), after a normalised-string shortcut.
- `numeric`: exact rational comparison of plain numbers (`12`, `-3.5`, `1,000`, `3/4`, `\\frac{3}{4}`),
  equal when identical or equal after rounding both to 6 decimals (math-verify's default); for arithmetic data.
- `auto` (default): `numeric` when both sides are plain numbers (fast, no sympy), `math` otherwise.

Extraction rules, in priority order (the first rule that fires decides; later rules are not consulted):
1. `\\boxed{...}` / `\\fbox{...}` with balanced (nested) braces. With several boxes the LAST one counts (the
   model's final word, the usual convention); an empty last box means no answer, with no fall-back to the
   earlier rules, so "\\boxed{}" is never rescued by a stray number. An unclosed box (a truncated response)
   is ignored.
2. GSM8K style `#### X` (the last one).
3. An answer phrase: "the answer is X", "final answer is X", "Answer: X" (the last one); X runs to the end
   of its line and stops at a sentence-ending period; a leading `$...$` / `\\(...\\)` / `\\[...\\]` is taken whole;
   when X is prose (three or more plain words) the answer is the last number or formula inside X.
4. Fallback: `numeric` takes the last number in the text; `math`/`auto` take the last LaTeX environment or
   the last number, whichever ends later.

Deviations: the paper filters its data with Math-Verify but does not give its eval extraction rules; these
are ours. math-verify's timeouts use SIGALRM, which works only in the main thread: there we pass 5-second
timeouts; in any other thread we pass None (no timeout) rather than crash.

    stableopd eval --model tiny --data problems.jsonl -s eval.checker=math
"""

from __future__ import annotations

import ast
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal, Protocol

from stableopd.errors import UserError

MV_TIMEOUT_S = 5
ROUND_DIGITS = 6


class Checker(Protocol):
    name: str

    def extract(self, response: str) -> str | None: ...

    def equal(self, extracted: str, gold: str) -> bool: ...


@dataclass(frozen=True)
class AnswerCheck:
    extracted: str | None  # None: the response commits to no answer
    correct: bool


# ---------------------------------------------------------------- extraction

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_PHRASE = re.compile(r"(?i)\banswer\**\s*(?:is\b\s*:?|:|=)[ \t]*")
_ENV = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$([^$]+?)(?<!\\)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
_ENV_AT_START = re.compile(r"\s*(?:\$\$(.+?)\$\$|\$([^$\n]+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\))", re.DOTALL)
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\\[dt]?frac\{\d+\}\{\d+\}|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)(?![\d])"
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_TRAILING_WORDS = re.compile(r"(?<=[\d}\)\]])\s+[A-Za-z][A-Za-z\s]*$")
_WORD = re.compile(r"(?<![\w\\])[A-Za-z]{2,}(?![\w{])")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+(?:\{[^{}]*\})?")


def boxed_contents(text: str) -> list[str]:
    """Contents of every complete top-level `\\boxed{...}` / `\\fbox{...}`, in order; braces may nest."""
    out, pos = [], 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\":  # an escaped brace \{ or \} is content, not structure
                i += 2
                continue
            depth += (ch == "{") - (ch == "}")
            i += 1
        if depth:  # unclosed: a truncated response
            break
        out.append(text[m.end() : i - 1])
        pos = i
    return out


def _unwrap_env(s: str) -> str:
    m = _ENV_AT_START.match(s)
    if m and m.end() == len(s.rstrip()):
        return next(g for g in m.groups() if g is not None)
    return s


def clean_span(span: str) -> str | None:
    """Trim an answer phrase to its answer: first env, sentence end, markdown, trailing words."""
    span = span.strip()
    if (opener := _BOX_OPEN.match(span)) and not boxed_contents(span):  # "answer is \\boxed{12" cut short
        span = span[opener.end() :]
    env = _ENV_AT_START.match(span)
    if env:
        span = next(g for g in env.groups() if g is not None)
    else:
        span = _SENTENCE_END.split(span, maxsplit=1)[0]
    span = span.strip().strip("*").strip()
    span = _unwrap_env(span).strip().rstrip(".,;:!").strip()
    span = _TRAILING_WORDS.sub("", span)
    return span or None


def _last_line_span(text: str, start: int) -> str:
    rest = text[start:]
    if _ENV_AT_START.match(rest):
        return rest
    stripped = rest.lstrip(" \t")
    if stripped.startswith("\n"):  # "The answer is:\n 42"
        stripped = stripped.lstrip()
    return stripped.split("\n", 1)[0]


def extract_answer(text: str, *, fallback: Literal["number", "latex_or_number", "none"]) -> str | None:
    """The answer a response commits to, by the rules in the module docstring; None for no answer."""
    boxes = boxed_contents(text)
    if boxes:
        return clean_span(boxes[-1]) if boxes[-1].strip() else None
    hashes = list(_HASHES.finditer(text))
    if hashes and (span := clean_span(hashes[-1].group(1))):
        return span
    phrases = list(_PHRASE.finditer(text))
    if phrases and (span := clean_span(_last_line_span(text, phrases[-1].end()))):
        if not _is_prose(span):
            return span
        # "the answer is the sum of both, i.e. 12": the answer is the last number or formula in it
        if fallback != "none" and (inner := _last_number_or_env(span, latex=fallback == "latex_or_number")):
            return inner
    if fallback == "none":
        return None
    return _last_number_or_env(text, latex=fallback == "latex_or_number")


def _is_prose(span: str) -> bool:
    """Three or more plain words (LaTeX commands aside): a sentence, not an answer like `17` or `C`."""
    return len(_WORD.findall(_LATEX_CMD.sub(" ", span))) >= 3


def _last_number_or_env(text: str, *, latex: bool) -> str | None:
    numbers = list(_NUMBER.finditer(text))
    envs = list(_ENV.finditer(text)) if latex else []
    best_num = numbers[-1] if numbers else None
    best_env = next((m for m in reversed(envs) if any(g and g.strip() for g in m.groups())), None)
    if best_env is not None and (best_num is None or best_env.end() >= best_num.end()):
        return clean_span(next(g for g in best_env.groups() if g is not None))
    return best_num.group(0) if best_num else None


# ---------------------------------------------------------------- numbers

_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
MAX_ANSWER_DIGITS = 20_000
_PLAIN = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+)?$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGN = re.compile(r"^[A-Za-z]\w*\s*=\s*")


def to_number(s: str) -> Fraction | None:
    """A plain number as an exact Fraction, or None if `s` is anything more than a number.

    Accepts integers, decimals, thousands separators (`1,000`, `1{,}000`), `a/b`, `\\frac{a}{b}`,
    `\\dfrac`, `\\frac12`, a leading `x =`, surrounding `$`, and trailing unit words (`12 apples`).
    """
    s = _unwrap_env(s.strip()).strip()
    s = _ASSIGN.sub("", s)
    s = _TRAILING_WORDS.sub("", s)
    s = (
        s.replace("{,}", ",")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\left", "")
        .replace("\\right", "")
    )
    s = s.replace(" ", "").replace("\u2212", "-")
    while len(s) >= 2 and s[0] + s[-1] in ("()", "{}") and s.count(s[0]) == 1:
        s = s[1:-1]
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if len(s) > MAX_ANSWER_DIGITS:  # compared as text by the math checker, never converted
        return None
    with _long_ints():
        for pattern in (_FRAC, _FRAC_SHORT):
            if m := pattern.match(s):
                den = int(m.group(3))
                return None if den == 0 else Fraction(int(m.group(2)), den) * (-1 if m.group(1) else 1)
        if _PLAIN.match(s):
            try:
                return Fraction(s)
            except (ValueError, ZeroDivisionError):
                return None
    return None


@contextmanager
def _long_ints() -> Iterator[None]:
    """Python refuses int(str) beyond 4300 digits by default; an answer of up to MAX_ANSWER_DIGITS is
    converted exactly (the cost is bounded by that length)."""
    old = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else None
    if old is not None and old and old < MAX_ANSWER_DIGITS:
        sys.set_int_max_str_digits(MAX_ANSWER_DIGITS)
    try:
        yield
    finally:
        if old is not None:
            sys.set_int_max_str_digits(old)


def numbers_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or round(a, ROUND_DIGITS) == round(b, ROUND_DIGITS)


# ---------------------------------------------------------------- math-verify


def _mv_timeout() -> int | None:
    # math-verify times out with signal.alarm, which raises outside the main thread.
    return MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _mv_parse(latex: str, timeout: int | None) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        return tuple(parse(f"${latex}$", extraction_config=config, parsing_timeout=timeout))
    except Exception:  # math-verify raises on pathological input; an unparsable answer is just wrong
        return ()


def math_equal(extracted: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain, without `$` delimiters)."""
    from math_verify import verify

    timeout = _mv_timeout()
    gold_p, pred_p = _mv_parse(gold, timeout), _mv_parse(extracted, timeout)
    if not gold_p or not pred_p:
        return False
    try:
        return bool(verify(list(gold_p), list(pred_p), timeout_seconds=timeout))
    except Exception:
        return False


def _norm(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    return re.sub(r"\s+|\\left|\\right|\\!|\\,|\$", "", s)


# ---------------------------------------------------------------- checkers


class NumericChecker:
    name = "numeric"

    def extract(self, response: str) -> str | None:
        return extract_answer(response, fallback="number")

    def equal(self, extracted: str, gold: str) -> bool:
        a, b = (
            to_number(extracted.replace("\\%", "").rstrip("%")),
            to_number(gold.replace("\\%", "").rstrip("%")),
        )
        return a is not None and b is not None and numbers_equal(a, b)


class MathChecker:
    name = "math"

    def extract(self, response: str) -> str | None:
        return extract_answer(response, fallback="latex_or_number")

    def equal(self, extracted: str, gold: str) -> bool:
        return _norm(extracted) == _norm(gold) or math_equal(extracted, gold)


class AutoChecker(MathChecker):
    name = "auto"

    def equal(self, extracted: str, gold: str) -> bool:
        a, b = to_number(extracted), to_number(gold)
        if a is not None and b is not None:
            return numbers_equal(a, b)
        return super().equal(extracted, gold)


_CHECKERS: dict[str, Checker] = {}


def register_checker(checker: Checker, *, replace: bool = False) -> None:
    """Make `checker` available as `eval.checker=<checker.name>`."""
    if checker.name in _CHECKERS and not replace:
        raise ValueError(f"checker '{checker.name}' is already registered")
    _CHECKERS[checker.name] = checker


def checker_names() -> list[str]:
    return sorted(_CHECKERS)


def get_checker(name: str) -> Checker:
    if name not in _CHECKERS:
        raise UserError(f"unknown answer checker '{name}'; available: {', '.join(checker_names())}")
    return _CHECKERS[name]


for _builtin in (AutoChecker(), MathChecker(), NumericChecker()):
    register_checker(_builtin)


def normalize_gold(answer: str) -> str:
    """Gold answers stored as a list (`['$\\\\frac12$']`, OlympiadBench style) become one string; `$` go."""
    s = answer.strip()
    if s.startswith("[") and s.endswith("]") and ("'" in s or '"' in s):
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            s = ", ".join(v.strip() for v in value)
    return _unwrap_env(s).strip()


def check(response: str, gold: str, checker: str | Checker = "auto") -> AnswerCheck:
    """Extract the answer of `response` and compare it with `gold`; an unextractable answer is wrong."""
    chk = get_checker(checker) if isinstance(checker, str) else checker
    extracted = chk.extract(response)
    if extracted is None:
        return AnswerCheck(None, False)
    return AnswerCheck(extracted, bool(chk.equal(extracted, normalize_gold(gold))))
