"""Response records to per-step metrics, streamed: JSONL reading that never crashes and running sums.

`iter_jsonl` yields the JSON objects of a file one line at a time, counting every line it skips (blank, not
JSON, not an object, cut off at the end) in `LineProblems`, which keeps the first few line numbers of each
kind for warnings. `StepStats` adds one response record at a time to a step's sums (length, truncation,
repetition by the zlib rule, repetitive-token fraction, the repetitive / regular advantage split), so a step
or a file of any size costs the same memory. `stableopd.diagnostics.analysis` builds its series from these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stableopd.core.repetition import is_repetitive, repetitive_token_mask
from stableopd.files import MIB, iter_lines

_LENGTH_FINISH = {"length", "max_tokens", "max_length", "truncated"}
MAX_LINE_WARNINGS = 5  # per file and kind; the rest are counted in one summary line


@dataclass
class ShownResponse:
    """One response kept for the report: the most repetitive truncated ones come first."""

    source: str  # "rollouts/step_000012.jsonl:7"
    step: int | None
    text: str
    ratio: float
    truncated: bool | None
    repetitive: bool


class LineProblems:
    """Lines that had to be skipped, by kind: the first few line numbers of each kind and a count."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[list[int], int]] = {}
        self.bad_utf8 = 0

    def add(self, kind: str, no: int) -> None:
        nos, count = self.kinds.get(kind, ([], 0))
        if len(nos) < MAX_LINE_WARNINGS:
            nos.append(no)
        self.kinds[kind] = (nos, count + 1)

    def warnings(self, name: str, what: str = "skipped") -> list[str]:
        out = []
        for kind, (nos, count) in self.kinds.items():
            out += [f"{name}:{no}: {kind}, {what}" for no in nos]
            if count > len(nos):
                out.append(f"{name}: {count - len(nos)} more lines {kind}, {what}")
        return out


def iter_jsonl(path: Path, problems: LineProblems, *, max_line_mb: int = 64) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON object line, streamed; other lines are counted in `problems`.

    Bytes that are not UTF-8 are replaced (another tool's log is read as far as it goes); a line over
    `max_line_mb` MiB is an error (diagnose.max_line_mb)."""
    blanks: list[int] = []
    for no, line, newline in iter_lines(
        path, max_line_bytes=max_line_mb * MIB, key="diagnose.max_line_mb", errors="replace"
    ):
        if "\ufffd" in line:
            problems.bad_utf8 += 1
        if not line.strip():
            blanks.append(no)  # only a blank line before another record is worth a warning
            continue
        for blank in blanks:
            problems.add("blank line", blank)
        blanks = []
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            problems.add("not valid JSON" if newline else "cut off (the file ends mid-record)", no)
            continue
        if not isinstance(obj, dict):
            problems.add(f"a JSON {type(obj).__name__}, not an object", no)
            continue
        yield no, obj


def _truncated(rec: Mapping, truncated_field: str, finish_field: str) -> bool | None:
    flag = rec.get(truncated_field)
    if isinstance(flag, bool):
        return flag
    reason = rec.get(finish_field)
    return reason.lower() in _LENGTH_FINISH if isinstance(reason, str) else None


def _token_ids(rec: Mapping) -> list[int] | None:
    ids = rec.get("response_token_ids")
    return ids if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None


def _token_split(rec: Mapping, units: list[int], ngram: int, sums: dict[str, float]) -> str | None:
    """Add one response's repetitive-token counts and advantage split to `sums`; a warning or None."""
    mask = repetitive_token_mask(units, ngram)
    sums["tokens"] += len(mask)
    sums["rep_tokens"] += sum(mask)
    teacher, student, ids = rec.get("teacher_logprobs"), rec.get("sampler_logprobs"), _token_ids(rec)
    if ids is None or not isinstance(teacher, list) or not isinstance(student, list):
        return None
    if not len(teacher) == len(student) == len(ids):
        return "log-prob lists and token ids differ in length, not used"
    for t_lp, s_lp, rep in zip(teacher, student, mask, strict=True):
        kind = "repetitive" if rep else "regular"
        sums[f"adv_{kind}"] += t_lp - s_lp
        sums[f"n_{kind}"] += 1
    sums["teacher"] += sum(teacher)
    sums["student"] += sum(student)
    return None


class StepStats:
    """Running sums of one step's response metrics: records are added one at a time and dropped, so a step of
    any size costs the same memory. `metrics()` gives what `response_metrics` documents."""

    def __init__(
        self,
        prefix: str,
        *,
        text_field: str,
        finish_field: str,
        truncated_field: str,
        tail_chars: int,
        ratio: float,
        ngram: int,
        step: int | None = None,
    ) -> None:
        self.prefix, self.text_field, self.finish_field, self.truncated_field = (
            prefix,
            text_field,
            finish_field,
            truncated_field,
        )
        self.tail_chars, self.ratio, self.ngram, self.step = tail_chars, ratio, ngram, step
        self.warnings: list[str] = []
        self.more_warnings = 0
        self.n = self.n_rep = self.n_trunc_known = self.n_trunc = 0
        self.tokens_all = True  # every record so far has a token length
        self.len_tokens = self.len_words = 0.0
        self.max_tokens = self.max_words = 0
        self.correct_sum, self.n_correct = 0.0, 0
        self.sums = dict.fromkeys(
            ("tokens", "rep_tokens", "adv_regular", "adv_repetitive", "teacher", "student"), 0.0
        ) | {"n_regular": 0, "n_repetitive": 0}

    def _warn(self, text: str) -> None:
        if len(self.warnings) < MAX_LINE_WARNINGS:
            self.warnings.append(text)
        else:
            self.more_warnings += 1

    def add(self, label: str, rec: Mapping) -> ShownResponse | None:
        """Count one record; the response kept for the report, or None (with a warning) when it has no text."""
        text = rec.get(self.text_field)
        if not isinstance(text, str):
            self._warn(f"{label}: no text field '{self.text_field}', skipped")
            return None
        ids = _token_ids(rec)
        words = text.split()
        n_tok = rec.get("n_tokens")
        has_tokens = isinstance(n_tok, int) or ids is not None
        n_tok = n_tok if isinstance(n_tok, int) else len(ids or [])
        self.tokens_all &= has_tokens
        self.len_tokens += n_tok
        self.len_words += len(words)
        self.max_tokens, self.max_words = max(self.max_tokens, n_tok), max(self.max_words, len(words))
        if isinstance(rec.get("correct"), (bool, int, float)):
            self.correct_sum += float(rec["correct"])
            self.n_correct += 1
        if ids is not None:
            units = ids
        else:
            vocab: dict[str, int] = {}  # words stand in for token ids when a record has none
            units = [vocab.setdefault(w, len(vocab)) for w in words]
        if (warn := _token_split(rec, units, self.ngram, self.sums)) is not None:
            self._warn(f"{label}: {warn}")
        rep, r = is_repetitive(text, self.tail_chars, self.ratio)
        truncated = _truncated(rec, self.truncated_field, self.finish_field)
        self.n += 1
        self.n_rep += rep
        if truncated is not None:
            self.n_trunc_known += 1
            self.n_trunc += truncated
        return ShownResponse(label, self.step, text, r, truncated, rep)

    @property
    def unit(self) -> str:
        return "tokens" if self.tokens_all else "words"

    def metrics(self) -> dict[str, float]:
        if not self.n:
            return {}
        p, sums = self.prefix, self.sums
        total, longest = (
            (self.len_tokens, self.max_tokens) if self.tokens_all else (self.len_words, self.max_words)
        )
        m = {
            f"{p}/length_mean": total / self.n,
            f"{p}/length_max": float(longest),
            f"{p}/rep_rate": self.n_rep / self.n,
        }
        if self.n_trunc_known:
            m[f"{p}/trunc_rate"] = self.n_trunc / self.n_trunc_known
        if sums["tokens"]:
            m[f"{p}/rep_token_frac"] = sums["rep_tokens"] / sums["tokens"]
        if self.n_correct:
            m[f"{p}/accuracy"] = self.correct_sum / self.n_correct
        if p == "rollout":  # the record fields have no prefix; validation has no teacher
            n_lp = sums["n_regular"] + sums["n_repetitive"]
            for kind in ("regular", "repetitive"):
                if sums[f"n_{kind}"]:
                    m[f"adv/{kind}_mean"] = sums[f"adv_{kind}"] / sums[f"n_{kind}"]
            if n_lp:
                m["adv/mean"] = (sums["adv_regular"] + sums["adv_repetitive"]) / n_lp
                m["teacher/logprob_mean"] = sums["teacher"] / n_lp
                m["student/logprob_mean"] = sums["student"] / n_lp
        return m


def response_metrics(
    records: Sequence[tuple[str, dict]],
    *,
    prefix: str,
    text_field: str,
    finish_field: str,
    truncated_field: str,
    tail_chars: int,
    ratio: float,
    ngram: int,
    step: int | None = None,
) -> tuple[dict[str, float], list[ShownResponse], list[str], str]:
    """One step's metrics from its responses: (metrics, examples, warnings, length unit).

    `records` are (source label, record) pairs; records without a string `text_field` are skipped with a
    warning. Rates are means over responses; rep_token_frac and the advantage means are token-weighted.
    """
    stats = StepStats(
        prefix,
        text_field=text_field,
        finish_field=finish_field,
        truncated_field=truncated_field,
        tail_chars=tail_chars,
        ratio=ratio,
        ngram=ngram,
        step=step,
    )
    examples = [ex for label, rec in records if (ex := stats.add(label, rec)) is not None]
    warnings = stats.warnings + (
        [f"{stats.more_warnings} more record warnings"] if stats.more_warnings else []
    )
    return stats.metrics(), examples, warnings, stats.unit
