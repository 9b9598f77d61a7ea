"""Repetition of a response: the paper's zlib rule, a per-token rule, and the looping span of a text.

1. Response level (the paper's section 2). A response is repetitive when it is longer than `tail_chars` (L)
   characters and the last L characters, UTF-8 encoded, compress by more than `ratio` (tau):
   len(tail) / len(zlib.compress(tail)) > tau. The paper uses L = 10,000 and tau = 10, sized for 8k-token
   reasoning traces; responses of a few hundred characters need a smaller L or they can never count.
2. Token level (`repetitive_token_mask`). The paper plots the advantage of "repetitive" vs "regular" tokens
   but never says how a token is labelled. Our rule (a deviation we had to invent): token t of a response is
   repetitive when it lies inside a window of `ngram` consecutive token ids that already occurred, with the
   same ids, at an earlier start in the same response (occurrences may overlap). The first copy of a loop is
   therefore regular and every later copy repetitive; a loop of any period p is caught once it has run for
   p + ngram tokens. The default ngram = 16 is long enough that ordinary reasoning (which reuses short
   phrases such as "so the answer is") stays regular. Windows are hashed with a rolling polynomial hash and
   every hash hit is checked against the ids, so there are no false matches; cost O(T + ngram * hits).
3. Looping span (`repeating_span`). The same window rule on the characters of a text marks every character
   inside a repeated `ngram`-character window; the span is the last marked region (unmarked gaps shorter than
   `ngram` are bridged, so near-copies from temperature sampling still join), extended back over the first
   copy that the region repeats. Used by `stableopd diagnose` to highlight the loop in the worst examples.

    stableopd diagnose RUN_DIR     # prints the worst looping responses with this span highlighted
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

_MOD = (1 << 61) - 1  # Mersenne prime: the rolling hash stays an exact Python int below 2**61
_BASE = 1_000_003


def compression_ratio(text: str, tail_chars: int) -> float:
    """len(tail) / len(zlib.compress(tail)) over the last `tail_chars` characters (0.0 for empty text)."""
    tail = text[-tail_chars:].encode("utf-8")
    if not tail:
        return 0.0
    return len(tail) / len(zlib.compress(tail))


def is_repetitive(text: str, tail_chars: int, ratio: float) -> tuple[bool, float]:
    """(repetitive, compression ratio of the tail) under the zlib rule."""
    r = compression_ratio(text, tail_chars)
    return (len(text) > tail_chars and r > ratio), r


def _repeated_windows(seq: Sequence[int], n: int) -> Iterator[tuple[int, int]]:
    """Yield (i, j) for every window seq[i:i+n] equal to an earlier window seq[j:j+n], j < i the first one."""
    if n < 1:
        raise ValueError(f"ngram must be >= 1, got {n}")
    if len(seq) < n:
        return
    top = pow(_BASE, n - 1, _MOD)  # weight of the element that leaves the window
    h = 0
    for x in seq[:n]:
        h = (h * _BASE + x + 1) % _MOD
    first: dict[int, list[int]] = {}  # hash -> first starts of the distinct windows with that hash
    for i in range(len(seq) - n + 1):
        if i:
            h = ((h - (seq[i - 1] + 1) * top) * _BASE + seq[i + n - 1] + 1) % _MOD
        starts = first.setdefault(h, [])
        for j in starts:
            if seq[j : j + n] == seq[i : i + n]:
                yield i, j
                break
        else:
            starts.append(i)


def repetitive_token_mask(token_ids: Sequence[int], ngram: int = 16) -> list[bool]:
    """Per token: True when it lies in an `ngram`-token window that repeats an earlier window of the response.

    Rule and cost in the module docstring. Responses shorter than ngram + 1 tokens have no repetitive token.
    """
    ids = list(token_ids)
    mask = [False] * len(ids)
    filled = 0  # mask[:filled] already decided for every window seen so far
    for i, _ in _repeated_windows(ids, ngram):
        for t in range(max(i, filled), i + ngram):
            mask[t] = True
        filled = max(filled, i + ngram)
    return mask


def repeating_span(text: str, ngram: int = 24, min_chars: int | None = None) -> tuple[int, int] | None:
    """(start, end) character offsets of the last looping region of `text`, or None when nothing loops.

    `min_chars` (default 2 * ngram) is the shortest span reported. text[start:end] is the loop, first copy
    included; the rule is in the module docstring.
    """
    codes = [ord(c) for c in text]
    mask = [False] * len(codes)
    source: dict[int, int] = {}  # window start -> start of the earlier window it repeats
    filled = 0
    for i, j in _repeated_windows(codes, ngram):
        source[i] = j
        for t in range(max(i, filled), i + ngram):
            mask[t] = True
        filled = max(filled, i + ngram)
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    if not end:
        return None
    start, gap = end, 0
    for t in range(end - 1, -1, -1):
        if mask[t]:
            start, gap = t, 0
        else:
            gap += 1
            if gap >= ngram:
                break
    first_copy = source.get(start)
    if first_copy is not None and start - first_copy <= end - start:
        start = first_copy
    if end - start < (2 * ngram if min_chars is None else min_chars):
        return None
    return start, end
