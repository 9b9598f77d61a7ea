"""`builtin:arith`: a deterministic world of arithmetic problems with written-out golden solutions.

Problems are column addition, subtraction and multiplication by a one-digit number, with solutions that
work digit by digit, carrying and borrowing, and end with "The answer is N." The same source string
always yields the same problems; `train` and `validation` draw from disjoint seeds and validation drops
any problem that also occurs in train.

Knobs go in the source string: `builtin:arith?digits=3&ops=+-*&n=2000`
    digits  number of digits of the operands (default 3)
    ops     which operations (default "+-*")
    n       problems in the train split (default 2000; validation gets n // 10, at least 64)
    checks  self-verification lines before the answer (default 0): a count `2`, a range `1-3`, or a
            weighted mixture `0*5,1-2*2,5-8*3` (range*weight; the count is drawn per problem, range
            uniform). Each is the line `Wait, let me check.`: the filler that long reasoning traces
            loop on, the same for every problem, so a tiny model copies it as easily as a large one.
            The problems and answers do not depend on `checks`, only the solutions' length does.

    stableopd rollout --model tiny --data "builtin:arith?digits=2&ops=+"
"""

from __future__ import annotations

import random
import re
from urllib.parse import parse_qs

from stableopd.errors import UserError
from stableopd.types import Example

VAL_SEED_OFFSET = 1_000_003


def _digits(x: int) -> list[int]:
    return [int(c) for c in reversed(str(x))]


def solve_add(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry, digit = divmod(s, 10)
        lines.append(f"{expr}={s}, write {digit}" + (f" carry {carry}" if carry else ""))
    if carry:
        lines.append(f"write {carry}")
    return lines


def solve_sub(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        if x < y:
            lines.append(f"{x}-{y}: borrow, {x + 10}-{y}={x + 10 - y}, write {x + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{x}-{y}={x - y}, write {x - y}")
            borrow = 0
    return lines


def solve_mul(a: int, b: int) -> list[str]:
    lines, carry = [], 0
    for x in _digits(a):
        p = x * b + carry
        expr = f"{x}*{b}" + (f"+{carry}" if carry else "")
        carry, digit = divmod(p, 10)
        lines.append(f"{expr}={p}, write {digit}" + (f" carry {carry}" if carry else ""))
    if carry:
        lines.append(f"write {carry}")
    return lines


CHECK_LINE = "Wait, let me check."


def parse_checks(spec: str, source: str) -> tuple[tuple[int, int, int], ...]:
    """`0*5,1-2*2,5-8*3` -> ((lo, hi, weight), ...); a bare `2` is ((2, 2, 1),)."""
    parts = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?:\*(\d+))?", item.strip())
        if not m:
            raise UserError(f"checks in '{source}' must look like 2, 1-3 or 0*5,1-2*2,5-8*3, not '{spec}'")
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        weight = int(m.group(3) or 1)
        if hi < lo or weight < 1 or hi > 1000:
            raise UserError(f"checks in '{source}': '{item}' needs lo <= hi <= 1000 and a weight >= 1")
        parts.append((lo, hi, weight))
    return tuple(parts)


def draw_checks(mixture: tuple[tuple[int, int, int], ...], rng: random.Random) -> int:
    lo, hi, _ = rng.choices(mixture, weights=[w for *_, w in mixture])[0]
    return rng.randint(lo, hi)


def make_problem(rng: random.Random, digits: int, ops: str) -> tuple[str, int, list[str]]:
    op = rng.choice(ops)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "+":
        return f"{a}+{b}", a + b, solve_add(a, b)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}", a - b, solve_sub(a, b)
    b = rng.randint(2, 9)
    return f"{a}*{b}", a * b, solve_mul(a, b)


def parse_source(source: str) -> dict[str, int | str]:
    name, _, query = source.partition("?")
    if name != "builtin:arith":
        raise UserError(f"unknown built-in data source '{name}'; available: builtin:arith")
    opts: dict[str, int | str] = {"digits": 3, "ops": "+-*", "n": 2000, "checks": "0"}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in opts:
            raise UserError(f"unknown option '{key}' in '{source}'; options: digits, ops, n, checks")
        value = values[-1]
        if key == "ops":
            value = value.replace(" ", "+")  # a literal + in a query string reads as a space
            if not value or set(value) - set("+-*"):
                raise UserError(f"ops in '{source}' must be made of the characters + - *")
            opts[key] = value
        elif key == "checks":
            parse_checks(value, source)
            opts[key] = value
        else:
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{key} in '{source}' must be a positive integer")
            opts[key] = int(value)
    return opts


def _generate(rng: random.Random, count: int, digits: int, ops: str, exclude: set[str]) -> list[tuple]:
    seen, out = set(exclude), []
    for _ in range(count * 50):
        if len(out) == count:
            break
        expr, answer, steps = make_problem(rng, digits, ops)
        if expr in seen:
            continue
        seen.add(expr)
        out.append((expr, answer, steps))
    return out


def builtin_examples(
    source: str, *, split: str = "train", limit: int | None = None, seed: int = 0
) -> list[Example]:
    opts = parse_source(source)
    digits, ops, n = int(opts["digits"]), str(opts["ops"]), int(opts["n"])
    mixture = parse_checks(str(opts["checks"]), source)
    train = _generate(random.Random(seed), n, digits, ops, set())
    if split == "train":
        rows, tag = train, "train"
    elif split in ("validation", "val", "test"):
        rows = _generate(
            random.Random(seed + VAL_SEED_OFFSET), max(64, n // 10), digits, ops, {r[0] for r in train}
        )
        tag = "val"
    else:
        raise UserError(f"builtin:arith has splits train and validation, not '{split}'")
    examples = []
    for i, (expr, answer, steps) in enumerate(rows):
        # a separate stream per problem: the problems are the same whatever `checks` says
        k = draw_checks(mixture, random.Random(f"checks:{seed}:{tag}:{i}"))
        lines = steps + [CHECK_LINE] * k + [f"The answer is {answer}."]
        examples.append(
            Example(
                id=f"arith-{tag}-{i}",
                prompt=f"What is {expr}?",
                answer=str(answer),
                solution="\n".join(lines),
            )
        )
    return examples[:limit] if limit else examples
