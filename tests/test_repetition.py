"""The zlib rule, the per-token repetition mask and the looping span, against naive references."""

from __future__ import annotations

import random
import zlib

import pytest

from stableopd.core import repetition
from stableopd.core.repetition import compression_ratio, is_repetitive, repeating_span, repetitive_token_mask

WORDS = "the of and to a in is we so that for it as with be this on are by not".split()


def normal_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n_words))


def naive_mask(ids: list[int], n: int) -> list[bool]:
    """O(T^2 n): token t is repetitive iff some window [i, i+n) containing t equals a window starting earlier."""
    mask = [False] * len(ids)
    for i in range(len(ids) - n + 1):
        if any(ids[j : j + n] == ids[i : i + n] for j in range(i)):
            for t in range(i, i + n):
                mask[t] = True
    return mask


def test_zlib_rule_matches_independent_computation():
    rng = random.Random(0)
    loop = normal_text(rng, 40) + " " + "x = 3 + 4 so we check again. " * 80
    plain = normal_text(rng, 600)
    for text in (loop, plain, "short", ""):
        for tail in (50, 500, 2000):
            tail_bytes = text[-tail:].encode("utf-8")
            expect = len(tail_bytes) / len(zlib.compress(tail_bytes)) if tail_bytes else 0.0
            assert compression_ratio(text, tail) == pytest.approx(expect)
            flag, r = is_repetitive(text, tail, 10.0)
            assert flag == (len(text) > tail and expect > 10.0) and r == pytest.approx(expect)
    assert is_repetitive(loop, 2000, 10.0)[0] and not is_repetitive(plain, 2000, 10.0)[0]


def test_zlib_rule_needs_more_than_L_characters():
    text = "ab" * 50  # 100 characters, compresses very well
    assert not is_repetitive(text, 100, 2.0)[0]  # not longer than L
    assert is_repetitive(text + "a", 100, 2.0)[0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_token_mask_matches_naive_on_small_vocab(seed, n):
    rng = random.Random(seed)
    ids = [rng.randrange(4) for _ in range(rng.randrange(0, 60))]
    assert repetitive_token_mask(ids, n) == naive_mask(ids, n)


def test_token_mask_survives_forced_hash_collisions(monkeypatch):
    # a modulus of 7 makes most windows collide: only the id comparison keeps the mask exact
    monkeypatch.setattr(repetition, "_MOD", 7)
    rng = random.Random(3)
    for _ in range(20):
        ids = [rng.randrange(50) for _ in range(80)] + [1, 2, 3, 4] * 5
        assert repetitive_token_mask(ids, 4) == naive_mask(ids, 4)


def test_token_mask_loop_marks_every_copy_but_the_first():
    rng = random.Random(1)
    prefix = rng.sample(range(1000, 2000), 40)  # distinct ids: nothing repeats
    period = list(range(7))
    ids = prefix + period * 10
    mask = repetitive_token_mask(ids, ngram=4)
    assert not any(mask[: len(prefix) + len(period)])  # prefix and the first copy are regular
    assert all(mask[len(prefix) + len(period) :])  # every later copy is repetitive
    # a period longer than the n-gram is found once p + n tokens have looped
    long_period = rng.sample(range(100), 30)
    mask = repetitive_token_mask(prefix + long_period * 3, ngram=16)
    assert sum(mask) == 60


def test_token_mask_limits():
    assert repetitive_token_mask([], 16) == []
    assert repetitive_token_mask([5] * 16, 16) == [False] * 16  # one window, nothing earlier
    assert repetitive_token_mask([5] * 17, 16) == [False] + [True] * 16  # overlapping repeat counts
    assert repetitive_token_mask([1, 2, 1, 3, 2], 1) == [False, False, True, False, True]
    with pytest.raises(ValueError):
        repetitive_token_mask([1, 2], 0)


def test_token_mask_is_linear_time():
    import time

    ids = list(range(200)) * 100  # 20k tokens, all looping
    t0 = time.perf_counter()
    mask = repetitive_token_mask(ids, 16)
    assert time.perf_counter() - t0 < 2.0
    assert sum(mask) == len(ids) - 200


def test_repeating_span_covers_the_loop_first_copy_included():
    rng = random.Random(2)
    prefix = normal_text(rng, 60) + " "
    unit = "so the answer is 42, let me verify that again. "
    text = prefix + unit * 12
    start, end = repeating_span(text)
    assert end == len(text)
    assert len(prefix) - 5 <= start <= len(prefix) + 5  # the loop, not the prose before it


def test_repeating_span_bridges_sampling_noise_and_ignores_prose():
    rng = random.Random(4)
    prefix = normal_text(rng, 80) + " "
    copies = []
    for i in range(12):  # near-copies: one digit changes in every copy, as temperature sampling does
        copies.append(f"then we add {i % 10} to the running total and compare it with the bound. ")
    text = prefix + "".join(copies)
    start, end = repeating_span(text)
    assert end >= len(text) - 2 and start <= len(prefix) + len(copies[0]) + 5
    assert repeating_span(normal_text(rng, 300)) is None
    assert repeating_span("") is None
    assert repeating_span("abc" * 5) is None  # shorter than the minimum span


def test_repeating_span_finds_a_loop_that_stops_before_the_end():
    loop = "ab cd ef gh ij kl mn op " * 10
    text = "intro text that never repeats itself 123. " + loop + "Final answer: 7."
    start, end = repeating_span(text)
    assert text[start:end].strip().startswith("ab cd") and end <= len(text) - len("Final answer: 7.") + 1
