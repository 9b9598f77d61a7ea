"""`builtin:arith`: determinism, disjoint splits, knobs, and golden solutions re-checked from scratch."""

from __future__ import annotations

import re

import pytest

from stableopd.data.arith import CHECK_LINE, builtin_examples, parse_source
from stableopd.data.sources import load_examples
from stableopd.errors import UserError

PROMPT = re.compile(r"^What is (\d+)([+\-*])(\d+)\?$")
STEP = re.compile(r"(-?\d+(?:[+\-*]\d+)+)=(\d+)")  # "7+8+1=16", "13-5=8", "4*7+2=30"


def operands(prompt: str) -> tuple[int, str, int]:
    m = PROMPT.match(prompt)
    assert m, prompt
    return int(m.group(1)), m.group(2), int(m.group(3))


def evaluate(expr: str) -> int:
    """Left-to-right evaluation with * before + and -, written out without eval()."""
    terms = re.findall(r"[+\-]?\d+(?:\*\d+)*", expr.replace("--", "+"))
    total = 0
    for term in terms:
        factors = term.lstrip("+").split("*")
        value = 1
        for f in factors:
            value *= int(f)
        total += value
    return total


def check_solution(prompt: str, answer: str, solution: str) -> None:
    a, op, b = operands(prompt)
    true = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert int(answer) == true, prompt
    lines = solution.split("\n")
    assert lines[-1] == f"The answer is {true}."
    written = []
    for line in lines[:-1]:
        for expr, value in STEP.findall(line):
            assert evaluate(expr) == int(value), f"{prompt}: wrong step '{line}'"
        m = re.search(r"write (\d)(?: carry (\d))?$", line) or re.fullmatch(r"write (\d+)", line)
        assert m, f"{prompt}: step without a written digit: '{line}'"
        written.append(m.group(1))
    # the written digits, least significant first, spell the answer
    assert int("".join(reversed(written))) == true, prompt


def test_evaluate_reference_itself():
    assert evaluate("7+8+1") == 16 and evaluate("13-5") == 8 and evaluate("4*7+2") == 30
    assert evaluate("-1-3") == -4 and evaluate("9-3") == 6


@pytest.mark.parametrize("ops", ["+", "-", "*", "+-*"])
@pytest.mark.parametrize("digits", [1, 2, 4])
def test_golden_solutions_are_correct(ops, digits):
    n = 30 if digits == 1 else 300  # one-digit problems run out: leave some for validation
    source = f"builtin:arith?digits={digits}&ops={ops.replace('+', '%2B')}&n={n}"
    for split in ("train", "validation"):
        examples = builtin_examples(source, split=split)
        assert examples
        for ex in examples:
            a, op, b = operands(ex.prompt)
            assert op in ops
            if op == "-":
                assert a >= b
            if digits > 1 and op != "*":
                assert len(str(a)) == len(str(b)) == digits
            check_solution(ex.prompt, ex.answer, ex.solution)


def test_solvers_write_out_carries_and_borrows():
    from stableopd.data.arith import solve_add, solve_mul, solve_sub

    assert solve_add(587, 645) == [
        "7+5=12, write 2 carry 1",
        "8+4+1=13, write 3 carry 1",
        "5+6+1=12, write 2 carry 1",
        "write 1",
    ]
    assert solve_sub(105, 98) == [
        "5-8: borrow, 15-8=7, write 7",
        "-1-9: borrow, 9-9=0, write 0",
        "0-0=0, write 0",
    ]
    assert solve_mul(47, 3) == ["7*3=21, write 1 carry 2", "4*3+2=14, write 4 carry 1", "write 1"]


def test_deterministic():
    a = builtin_examples("builtin:arith?digits=2&n=100")
    b = builtin_examples("builtin:arith?digits=2&n=100")
    assert a == b and len(a) == 100
    assert builtin_examples("builtin:arith?digits=2&n=100", seed=1) != a
    assert len({e.prompt for e in a}) == len(a)  # no repeated problems
    assert [e.id for e in a[:2]] == ["arith-train-0", "arith-train-1"]


def test_train_and_validation_are_disjoint():
    source = "builtin:arith?digits=2&n=500"
    train = {e.prompt for e in builtin_examples(source, split="train")}
    val = builtin_examples(source, split="validation")
    assert len(val) == 64  # max(64, n // 10)
    assert not train & {e.prompt for e in val}
    assert [e.id for e in val[:1]] == ["arith-val-0"]
    assert builtin_examples(source, split="val") == val == builtin_examples(source, split="test")


def test_small_problem_space_still_disjoint():
    # one-digit addition has 100 problems; train takes what it can and validation only what is left
    source = "builtin:arith?digits=1&ops=%2B&n=90"
    train = {e.prompt for e in builtin_examples(source, split="train")}
    val = {e.prompt for e in builtin_examples(source, split="validation")}
    assert len(train) == 90 and len(val) == 10 and not train & val


def test_limit_and_defaults():
    assert len(builtin_examples("builtin:arith", limit=5)) == 5
    assert len(builtin_examples("builtin:arith")) == 2000
    assert builtin_examples("builtin:arith", limit=5) == builtin_examples("builtin:arith")[:5]


def test_through_load_examples():
    examples = load_examples("builtin:arith?n=50", limit=10, shuffle=True, seed=3)
    assert len(examples) == 10 and examples == load_examples(
        "builtin:arith?n=50", limit=10, shuffle=True, seed=3
    )
    for ex in examples:
        check_solution(ex.prompt, ex.answer, ex.solution)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("builtin:arith", {"digits": 3, "ops": "+-*", "n": 2000, "checks": "0"}),
        # a literal + in a query string reads as a space
        ("builtin:arith?digits=2&ops=+", {"digits": 2, "ops": "+", "n": 2000, "checks": "0"}),
        ("builtin:arith?ops=%2B-&n=10", {"digits": 3, "ops": "+-", "n": 10, "checks": "0"}),
        (
            "builtin:arith?ops=*&ops=-",
            {"digits": 3, "ops": "-", "n": 2000, "checks": "0"},
        ),  # the last value wins
        ("builtin:arith?checks=0*5,1-2*2", {"digits": 3, "ops": "+-*", "n": 2000, "checks": "0*5,1-2*2"}),
    ],
)
def test_knobs(source, expected):
    assert parse_source(source) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin:arithmetic", "unknown built-in data source 'builtin:arithmetic'; available: builtin:arith"),
        (
            "builtin:arith?digit=2",
            "unknown option 'digit' in 'builtin:arith?digit=2'; options: digits, ops, n, checks",
        ),
        ("builtin:arith?digits=0", "digits in 'builtin:arith?digits=0' must be a positive integer"),
        ("builtin:arith?digits=two", "digits in 'builtin:arith?digits=two' must be a positive integer"),
        ("builtin:arith?n=-5", "n in 'builtin:arith?n=-5' must be a positive integer"),
        ("builtin:arith?n=", "n in 'builtin:arith?n=' must be a positive integer"),
        ("builtin:arith?ops=/", "ops in 'builtin:arith?ops=/' must be made of the characters + - *"),
        ("builtin:arith?ops=", "ops in 'builtin:arith?ops=' must be made of the characters + - *"),
        (
            "builtin:arith?checks=x",
            "checks in 'builtin:arith?checks=x' must look like 2, 1-3 or 0*5,1-2*2,5-8*3, not 'x'",
        ),
        (
            "builtin:arith?checks=3-1",
            "checks in 'builtin:arith?checks=3-1': '3-1' needs lo <= hi <= 1000 and a weight >= 1",
        ),
        (
            "builtin:arith?checks=1*0",
            "checks in 'builtin:arith?checks=1*0': '1*0' needs lo <= hi <= 1000 and a weight >= 1",
        ),
        (
            "builtin:arith?checks=",
            "checks in 'builtin:arith?checks=' must look like 2, 1-3 or 0*5,1-2*2,5-8*3, not ''",
        ),
    ],
)
def test_knob_errors(source, message):
    with pytest.raises(UserError) as exc:
        parse_source(source)
    assert str(exc.value) == message


def test_unknown_split():
    with pytest.raises(UserError) as exc:
        builtin_examples("builtin:arith?n=10", split="dev")
    assert str(exc.value) == "builtin:arith has splits train and validation, not 'dev'"


def split_checks(solution: str) -> tuple[str, list[str]]:
    """(solution without its check lines, the check lines)."""
    lines = solution.split("\n")
    checks = [line for line in lines if line == CHECK_LINE]
    return "\n".join(line for line in lines if line != CHECK_LINE), checks


@pytest.mark.parametrize("split", ["train", "validation"])
def test_checks_add_lines_before_the_answer_and_change_nothing_else(split):
    plain = builtin_examples("builtin:arith?digits=2&n=300", split=split)
    checked = builtin_examples("builtin:arith?digits=2&n=300&checks=0-3", split=split)
    counts = set()
    for p, c in zip(plain, checked, strict=True):
        assert (p.id, p.prompt, p.answer) == (c.id, c.prompt, c.answer)
        rest, lines = split_checks(c.solution)
        assert rest == p.solution  # the steps and the answer line are untouched
        counts.add(len(lines))
        if lines:  # the check lines sit between the steps and the answer line
            assert c.solution.split("\n")[-len(lines) - 1 : -1] == lines
    assert counts == {0, 1, 2, 3}


def test_checks_mixture_weights():
    examples = builtin_examples("builtin:arith?digits=2&n=4000&checks=0*5,1-2*2,5-8*3")
    counts = [len(split_checks(ex.solution)[1]) for ex in examples]
    assert set(counts) <= {0, 1, 2, 5, 6, 7, 8}
    share = {k: sum(c in k for c in counts) / len(counts) for k in [(0,), (1, 2), (5, 6, 7, 8)]}
    assert (
        abs(share[(0,)] - 0.5) < 0.03
        and abs(share[(1, 2)] - 0.2) < 0.03
        and abs(share[(5, 6, 7, 8)] - 0.3) < 0.03
    )
    again = builtin_examples("builtin:arith?digits=2&n=4000&checks=0*5,1-2*2,5-8*3")
    assert [ex.solution for ex in again] == [ex.solution for ex in examples]
