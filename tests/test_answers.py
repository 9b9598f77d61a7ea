"""Answer extraction and checking on hand-written (response, gold, expected) cases.

Every expected value below was decided by hand from the rules in stableopd/eval/answers.py's docstring, not by
running the checker.
"""

from __future__ import annotations

import threading

import pytest

from stableopd.errors import UserError
from stableopd.eval.answers import (
    AnswerCheck,
    boxed_contents,
    check,
    checker_names,
    extract_answer,
    get_checker,
    normalize_gold,
    register_checker,
    to_number,
)

# (response, gold, expected correct) under the default "auto" checker
AUTO_CASES = [
    # boxed answers
    (r"Thus the total is \boxed{42}.", "42", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"In polar form \boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
    (r"\fbox{7}", "7", True),
    (r"\boxed{x = 5}", "5", True),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", True),
    (r"\boxed{[0, 1)}", "[0,1)", True),
    (r"\boxed{\infty}", r"\infty", True),
    (r"\boxed{\text{(C)}}", "C", True),
    (r"\boxed{\text{(C)}}", "D", False),
    # an empty box is no answer, and no fallback rescues it
    (r"\boxed{}", "5", False),
    (r"The result is 5. \boxed{ }", "5", False),
    # several boxes: the last one counts
    (r"First \boxed{3}, but wait, actually \boxed{4}", "4", True),
    (r"First \boxed{3}, but wait, actually \boxed{4}", "3", False),
    (r"\boxed{4} is wrong; the answer is \boxed{\frac{9}{2}}", "4.5", True),
    # an unclosed box (a truncated response) is ignored; the last number decides
    (r"so the answer is \boxed{12", "12", True),
    # fractions vs decimals
    ("The answer is 0.75", r"\frac{3}{4}", True),
    (r"\boxed{3/4}", "0.75", True),
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    (r"\boxed{0.333333}", "1/3", True),
    (r"\boxed{\dfrac{7}{2}}", "3.5", True),
    (r"\boxed{2.50}", "5/2", True),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    (r"\boxed{\frac{1}{2}}", "-0.5", False),
    # LaTeX vs plain
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"The answer is $\pi/2$.", r"\frac{\pi}{2}", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1{,}000}", "1000", True),
    (r"\boxed{10\%}", "10", True),
    # wrong answers that share digits
    (r"\boxed{120}", "12", False),
    (r"\boxed{21}", "12", False),
    ("The answer is 3.14", "3.14159", False),
    ("#### 1001", "1000", False),
    ("Adding up, we get 125", "25", False),
    (r"\boxed{\frac{1}{12}}", r"\frac{1}{2}", False),
    (r"\boxed{2\sqrt{3}}", "2", False),
    (r"\boxed{-12}", "12", False),
    # no answer at all
    ("I don't know.", "5", False),
    ("", "0", False),
    ("Let me think about this problem carefully", "7", False),
    # final-answer phrases
    (r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("**Answer:** 42", "42", True),
    ("Answer: 17 apples", "17", True),
    ("The answer is 5. It took 3 steps to get there.", "5", True),
    ("The answer is:\n\\[\n\\frac{5}{6}\n\\]\nDone.", "5/6", True),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", True),
    ("#### 1,234", "1234", True),
    # a prose answer phrase: the last number or formula inside it
    ("The answer is that we add them together, which gives 12.", "12", True),
    (r"The answer is therefore $\frac{1}{2}$ of the total", "0.5", True),
    ("The answer is that I do not know", "5", False),
    # fallback: the last number or LaTeX environment
    ("so the total is 35 apples", "35", True),
    (r"x equals $\frac{2}{3}$", "2/3", True),
    ("there are -4 of them", "-4", True),
]


@pytest.mark.parametrize("response,gold,expected", AUTO_CASES)
def test_auto_checker_hand_cases(response, gold, expected):
    assert check(response, gold, "auto").correct is expected


@pytest.mark.parametrize(
    "checker,response,gold,expected",
    [
        ("numeric", r"\boxed{\sqrt{8}}", r"2\sqrt{2}", False),  # numeric compares numbers only
        ("numeric", r"\boxed{50\%}", "50", True),
        ("numeric", "The answer is 3/4", "0.75", True),
        ("numeric", r"so x is $\frac{1}{2}$", "0.5", True),  # last number token is the \frac
        ("numeric", r"\boxed{1/3}", "0.3333333", True),
        ("numeric", r"\boxed{1/3}", "0.3333", False),
        ("numeric", "We need 7 - 2 = 5 boxes", "5", True),
        ("math", r"\boxed{7}", "7", True),
        ("math", r"\boxed{\frac{\pi}{2}}", r"\pi/2", True),
        ("math", r"\boxed{\frac{2}{4}}", "0.5", True),
        ("math", r"\boxed{y^2}", "x^2", False),
    ],
)
def test_named_checkers(checker, response, gold, expected):
    assert check(response, gold, checker).correct is expected


@pytest.mark.parametrize(
    "response,extracted",
    [
        (r"\boxed{3} then \boxed{4}", "4"),
        (r"\boxed{}", None),
        (r"\boxed{7} and finally \boxed{  }", None),
        (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}"),
        (r"\boxed{\{x \mid x > 0\}}", r"\{x \mid x > 0\}"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is 5 cm.", "5"),
        ("no numbers here", None),
        ("#### 18\n", "18"),
        ("Answer: $x=2$, so done", "x=2"),
        ("The answer is Monday", "Monday"),
        ("The answer is that I do not know", None),
        (r"The answer is \text{Evelyn}.", r"\text{Evelyn}"),
    ],
)
def test_extraction(response, extracted):
    assert extract_answer(response, fallback="latex_or_number") == extracted


def test_empty_box_extracts_nothing_even_with_numbers_around():
    assert check(r"We computed 12 and 13. \boxed{}", "13", "numeric") == AnswerCheck(None, False)


def test_boxed_contents_nesting_and_escaped_braces():
    text = r"a \boxed{\frac{1}{\sqrt{2}}} b \boxed{\{1, 2\}} c \boxed{unclosed"
    assert boxed_contents(text) == [r"\frac{1}{\sqrt{2}}", r"\{1, 2\}"]


@pytest.mark.parametrize(
    "text,value",
    [
        ("12", (12, 1)),
        ("-3.5", (-7, 2)),
        ("1,000", (1000, 1)),
        ("1{,}000", (1000, 1)),
        (r"\frac{3}{4}", (3, 4)),
        (r"-\dfrac{1}{2}", (-1, 2)),
        (r"\frac12", (1, 2)),
        ("x = 7", (7, 1)),
        ("$5$", (5, 1)),
        ("12 apples", (12, 1)),
        (".5", (1, 2)),
    ],
)
def test_to_number(text, value):
    from fractions import Fraction

    assert to_number(text) == Fraction(*value)


@pytest.mark.parametrize("text", [r"2\sqrt{2}", "1,2", "x", "", r"\frac{1}{0}", "3/0", "1.2.3", "(1, 2)"])
def test_to_number_rejects_non_numbers(text):
    assert to_number(text) is None


def test_gold_stored_as_a_list_is_unwrapped_but_intervals_are_not():
    stored = str([r"$\frac{1}{2}$"])  # what data.py makes of a list-valued answer field
    assert normalize_gold(stored) == r"\frac{1}{2}"
    assert normalize_gold("['3', '5']") == "3, 5"
    assert normalize_gold("[0, 1]") == "[0, 1]"
    assert check(r"\boxed{0.5}", stored).correct is True
    assert check(r"\boxed{0.25}", stored).correct is False


def test_checking_works_outside_the_main_thread():
    # math-verify's SIGALRM timeouts raise outside the main thread; we must not.
    results = {}

    def work():
        results["sym"] = check(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", "math")
        results["wrong"] = check(r"\boxed{\sqrt{7}}", r"2\sqrt{2}", "math")

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert results["sym"].correct is True and results["wrong"].correct is False


def test_registry_plugs_in_a_checker_and_rejects_unknown_names():
    class Letter:
        name = "test-letter"

        def extract(self, response: str) -> str | None:
            return response.strip()[-1:] or None

        def equal(self, extracted: str, gold: str) -> bool:
            return extracted.lower() == gold.lower()

    register_checker(Letter(), replace=True)
    assert "test-letter" in checker_names()
    assert check("I pick B", "b", "test-letter") == AnswerCheck("B", True)
    with pytest.raises(ValueError):
        register_checker(Letter())
    with pytest.raises(UserError, match="unknown answer checker 'nope'.*auto"):
        get_checker("nope")


@pytest.mark.parametrize("checker", ["auto", "numeric", "math"])
def test_numbers_past_pythons_digit_limit_are_compared_not_crashed(checker):
    big = "9" * 5000  # Python refuses int() of more than 4300 digits unless asked
    assert check(f"so \\boxed{{{big}}}", big, checker).correct
    assert not check(f"so \\boxed{{{big}8}}", big, checker).correct
    assert not check(f"\\boxed{{\\frac{{1}}{{{big}}}}}", "0.5", checker).correct
    huge = "7" * 30_000  # past the converter's own bound: never converted, still no crash
    assert check(f"\\boxed{{{huge}}}", huge, checker).correct == (checker != "numeric")
