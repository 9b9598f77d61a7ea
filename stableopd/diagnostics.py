"""Diagnose a run: read per-step series, then decide healthy / length inflation / truncation collapse.

Inputs (detected from PATH): a run directory (DESIGN.md: metrics.jsonl, rollouts/step_N.jsonl,
val/step_N.jsonl), a metrics.jsonl (objects with "step" and slash-named metrics), or any JSONL of responses
(our rollout records, or another tool's generations: text in `text_field`, optional finish reason,
truncated flag and step). Reading never crashes on bad lines: blank, non-JSON, non-object and cut-off lines
are skipped with a warning that names the line; input with no records at all is a `UserError` (exit 2).

Series. Values in metrics.jsonl win; rollout files fill only the (metric, step) pairs that metrics.jsonl
lacks, so rollout files are read for those steps plus the last `example_files` files (for the worst
examples). Recomputed per step: truncation from `truncated_field`, else a finish reason of "length" (or
"max_tokens", "max_length", "truncated"; unknown when neither field is there); repetition
by the zlib rule with the configured L and tau (stored `repetitive` flags are ignored, since they may use
another L); length = `n_tokens`, else len(response_token_ids), else whitespace-separated words for the whole
file (`length_unit` says which); the repetitive-token fraction and the repetitive/regular advantage split
(advantage = teacher - sampler log-prob per token) by `repetition.repetitive_token_mask`. A responses file
without a step field is one step (step 0), or steps of `chunk_size` consecutive records.

The detector and the live guard live in stableopd/detector.py; rendering in stableopd/report.py. With
several paths the CLI calls `compare.run_compare`, which diagnoses each path here with its own config and
puts the runs side by side; one path is `run_diagnose`.

Size: about 460 lines, over the house ~400, because reading a run directory, a metrics file and foreign
responses, and the per-step series from responses, all live in this one file.

    stableopd diagnose RUN_DIR [--json] [--plots DIR] [--strict] [--text-field NAME]
    stableopd diagnose RUN_A RUN_B ... [--json] [--plots DIR] [--strict]
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stableopd.config import DiagnoseConfig
from stableopd.detector import (  # noqa: F401 (CollapseGuard, detect and Verdict are re-exported)
    LENGTH,
    REP,
    TRUNC,
    CollapseGuard,
    Verdict,
    VerdictName,
    _median,
    _number,
    detect,
)
from stableopd.errors import UserError
from stableopd.repetition import is_repetitive, repetitive_token_mask

ROLLOUT_KEYS = (LENGTH, "rollout/length_max", TRUNC, REP, "rollout/rep_token_frac")
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")
_LENGTH_FINISH = {"length", "max_tokens", "max_length", "truncated"}
_MAX_LINE_WARNINGS = 5  # per file and kind; the rest are counted in one summary line


@dataclass
class Example:
    """One response kept for the report: the most repetitive truncated ones come first."""

    source: str  # "rollouts/step_000012.jsonl:7"
    step: int | None
    text: str
    ratio: float
    truncated: bool | None
    repetitive: bool


@dataclass
class Diagnosis:
    path: Path
    kind: Literal["run", "metrics", "responses"]
    series: dict[str, dict[int, float]]  # metric -> step -> value
    verdict: Verdict
    warnings: list[str]
    examples: list[Example]
    length_unit: str = "tokens"

    @property
    def steps(self) -> list[int]:
        return sorted({s for values in self.series.values() for s in values})

    def final(self) -> dict[str, float | None]:
        """The last step's trunc_rate, rep_rate and length_mean (None where that series is absent)."""
        out: dict[str, float | None] = {}
        for key in (TRUNC, REP, LENGTH):
            values = self.series.get(key) or {}
            out[key.split("/")[1]] = values[max(values)] if values else None
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "verdict": self.verdict.verdict,
            "onset_step": self.verdict.onset_step,
            "reasons": self.verdict.reasons,
            "steps": len(self.steps),
            "first_step": self.steps[0] if self.steps else None,
            "last_step": self.steps[-1] if self.steps else None,
            "final": self.final(),
            "length_unit": self.length_unit,
            "warnings": self.warnings,
        }


# ---------------------------------------------------------------- reading


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, object) pairs of a JSONL file and warnings for every line that had to be skipped."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")
    cut_off = not raw.endswith("\n")  # the writer stopped mid-line (or never wrote the final newline)
    last = max((no for no, line in enumerate(lines, start=1) if line.strip()), default=0)
    records: list[tuple[int, dict]] = []
    problems: dict[str, list[int]] = {}
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            if no < last:  # trailing blank lines are harmless
                problems.setdefault("blank line", []).append(no)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            kind = "cut off (the file ends mid-record)" if cut_off and no == len(lines) else "not valid JSON"
            problems.setdefault(kind, []).append(no)
            continue
        if not isinstance(obj, dict):
            problems.setdefault(f"a JSON {type(obj).__name__}, not an object", []).append(no)
            continue
        records.append((no, obj))
    return records, _line_warnings(path.name, problems)


def _line_warnings(name: str, problems: dict[str, list[int]], what: str = "skipped") -> list[str]:
    out = []
    for kind, nos in problems.items():
        out += [f"{name}:{no}: {kind}, {what}" for no in nos[:_MAX_LINE_WARNINGS]]
        if len(nos) > _MAX_LINE_WARNINGS:
            out.append(f"{name}: {len(nos) - _MAX_LINE_WARNINGS} more lines {kind}, {what}")
    return out


def _metrics_series(
    records: list[tuple[int, dict]], name: str, warnings: list[str]
) -> dict[str, dict[int, float]]:
    """metric -> step -> value from metrics.jsonl objects; non-numeric values are ignored."""
    series: dict[str, dict[int, float]] = {}
    no_step: list[int] = []
    for no, rec in records:
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            no_step.append(no)
            continue
        for key, value in rec.items():
            if key != "step" and (x := _number(value)) is not None:
                series.setdefault(key, {})[step] = x
    warnings += _line_warnings(name, {"no integer 'step' field": no_step})
    return series


# ---------------------------------------------------------------- per-step metrics from responses


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
) -> tuple[dict[str, float], list[Example], list[str], str]:
    """One step's metrics from its responses: (metrics, examples, warnings, length unit).

    `records` are (source label, record) pairs; records without a string `text_field` are skipped with a
    warning. Rates are means over responses; rep_token_frac and the advantage means are token-weighted.
    """
    warnings = [
        f"{lb}: no text field '{text_field}', skipped"
        for lb, r in records
        if not isinstance(r.get(text_field), str)
    ]
    kept = [(lb, r) for lb, r in records if isinstance(r.get(text_field), str)]
    if not kept:
        return {}, [], warnings, "tokens"
    by_tokens = all(isinstance(r.get("n_tokens"), int) or _token_ids(r) is not None for _, r in kept)
    lengths, correct, examples = [], [], []
    sums = dict.fromkeys(("tokens", "rep_tokens", "adv_regular", "adv_repetitive", "teacher", "student"), 0.0)
    sums |= {"n_regular": 0, "n_repetitive": 0}
    vocab: dict[str, int] = {}  # words stand in for token ids when a record has none
    for label, rec in kept:
        text, ids = rec[text_field], _token_ids(rec)
        words = text.split()
        n_tokens = rec.get("n_tokens") if isinstance(rec.get("n_tokens"), int) else len(ids or [])
        lengths.append(n_tokens if by_tokens else len(words))
        if isinstance(rec.get("correct"), (bool, int, float)):
            correct.append(float(rec["correct"]))
        units = ids if ids is not None else [vocab.setdefault(w, len(vocab)) for w in words]
        if (warn := _token_split(rec, units, ngram, sums)) is not None:
            warnings.append(f"{label}: {warn}")
        rep, r = is_repetitive(text, tail_chars, ratio)
        examples.append(Example(label, step, text, r, _truncated(rec, truncated_field, finish_field), rep))
    m = {
        f"{prefix}/length_mean": sum(lengths) / len(lengths),
        f"{prefix}/length_max": float(max(lengths)),
        f"{prefix}/rep_rate": sum(ex.repetitive for ex in examples) / len(examples),
    }
    if known := [ex.truncated for ex in examples if ex.truncated is not None]:
        m[f"{prefix}/trunc_rate"] = sum(known) / len(known)
    if sums["tokens"]:
        m[f"{prefix}/rep_token_frac"] = sums["rep_tokens"] / sums["tokens"]
    if correct:
        m[f"{prefix}/accuracy"] = sum(correct) / len(correct)
    if prefix == "rollout":  # DESIGN.md names these without a prefix; validation has no teacher
        n_lp = sums["n_regular"] + sums["n_repetitive"]
        for kind in ("regular", "repetitive"):
            if sums[f"n_{kind}"]:
                m[f"adv/{kind}_mean"] = sums[f"adv_{kind}"] / sums[f"n_{kind}"]
        if n_lp:
            m["adv/mean"] = (sums["adv_regular"] + sums["adv_repetitive"]) / n_lp
            m["teacher/logprob_mean"] = sums["teacher"] / n_lp
            m["student/logprob_mean"] = sums["student"] / n_lp
    return m, examples, warnings, "tokens" if by_tokens else "words"


# ---------------------------------------------------------------- diagnose PATH


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.search(path.name)
    return int(m.group(1)) if m else None


def _merge(series: dict[str, dict[int, float]], metrics: Mapping[str, float], step: int) -> None:
    for key, value in metrics.items():
        series.setdefault(key, {}).setdefault(step, value)  # metrics.jsonl values win


def _records_kind(records: list[tuple[int, dict]], cfg: DiagnoseConfig, path: Path) -> str:
    texts = sum(isinstance(r.get(cfg.text_field), str) for _, r in records)
    if texts:
        return "responses"
    if any("step" in r and any("/" in k for k in r) for _, r in records):
        return "metrics"
    keys = sorted({k for _, r in records[:50] for k in r})[:12]
    raise UserError(
        f"{path}: records have no text field '{cfg.text_field}' and no metrics (keys seen: {', '.join(keys)}); "
        "pass --text-field NAME (diagnose.text_field) for another tool's generations"
    )


class _Reader:
    """Accumulates series, the worst examples, warnings and the length unit while files are read."""

    def __init__(self, cfg: DiagnoseConfig) -> None:
        self.cfg = cfg
        self.series: dict[str, dict[int, float]] = {}
        self.warnings: list[str] = []
        self.units: set[str] = set()
        self.responses = self.longer_than_tail = 0
        self._heap: list[tuple[tuple, int, Example]] = []  # min-heap of the worst examples so far
        self._order = itertools.count()  # tie-breaker: Examples do not compare

    def add(self, records: list[tuple[str, dict]], prefix: str, step: int) -> None:
        c = self.cfg
        metrics, examples, warns, unit = response_metrics(
            records, prefix=prefix, text_field=c.text_field, finish_field=c.finish_field,
            truncated_field=c.truncated_field, tail_chars=c.rep_tail_chars, ratio=c.rep_ratio,
            ngram=c.rep_token_ngram, step=step,
        )  # fmt: skip
        _merge(self.series, metrics, step)
        self.warnings += warns[:_MAX_LINE_WARNINGS] + (
            [f"{len(warns) - _MAX_LINE_WARNINGS} more record warnings at step {step}"]
            if len(warns) > _MAX_LINE_WARNINGS
            else []
        )
        if metrics:
            self.units.add(unit)
        self.responses += len(examples)
        self.longer_than_tail += sum(len(ex.text) > c.rep_tail_chars for ex in examples)
        if prefix == "rollout":
            for ex in examples:
                key = (ex.truncated is True, ex.repetitive, ex.ratio)
                heapq.heappush(self._heap, (key, next(self._order), ex))
                if len(self._heap) > c.examples:
                    heapq.heappop(self._heap)

    def add_file(self, path: Path, prefix: str, step: int) -> None:
        records, warns = read_jsonl(path)
        self.warnings += [f"{path.parent.name}/{w}" for w in warns]
        self.add([(f"{path.parent.name}/{path.name}:{no}", r) for no, r in records], prefix, step)

    def examples(self) -> list[Example]:
        return [ex for _, _, ex in sorted(self._heap, key=lambda item: item[0], reverse=True)]


@contextmanager
def _progress(label: str, total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda k=1: None
        return
    from stableopd.progress import progress_bar  # rich only when a bar is drawn

    with progress_bar(label, total) as advance:
        yield advance


def _read_run(run_dir: Path, reader: _Reader, progress: bool) -> None:
    metrics_path = run_dir / "metrics.jsonl"
    rollout_files = sorted(run_dir.glob("rollouts/step_*.jsonl"))
    val_files = sorted(run_dir.glob("val/step_*.jsonl"))
    if not metrics_path.is_file() and not rollout_files and not val_files:
        raise UserError(f"{run_dir} is not a run directory: no metrics.jsonl, rollouts/ or val/ files in it")
    if metrics_path.is_file():
        records, warns = read_jsonl(metrics_path)
        reader.warnings += warns
        reader.series.update(_metrics_series(records, metrics_path.name, reader.warnings))
    else:
        reader.warnings.append(f"{metrics_path.name} missing: every series is recomputed from rollouts")
    last = set(rollout_files[len(rollout_files) - reader.cfg.example_files :])
    todo = []  # (file, prefix, step) still to read: metrics missing there, or wanted for examples
    for prefix, files, keys in (
        ("rollout", rollout_files, ROLLOUT_KEYS),
        ("val", val_files, ("val/rep_rate",)),
    ):
        for f in files:
            step = _step_of(f)
            if step is not None and (f in last or any(step not in reader.series.get(k, {}) for k in keys)):
                todo.append((f, prefix, step))
    with _progress("reading rollouts", len(todo), enabled=progress and len(todo) > 1) as advance:
        for f, prefix, step in todo:
            reader.add_file(f, prefix, step)
            advance(1)
    if not reader.series:
        raise UserError(f"{run_dir} is empty: its metrics.jsonl and rollout files hold no records")


def _read_responses(path: Path, records: list[tuple[int, dict]], reader: _Reader) -> None:
    field_, chunk = reader.cfg.step_field, reader.cfg.chunk_size
    if any(field_ in r for _, r in records):
        groups: dict[int, list[tuple[str, dict]]] = {}
        bad = []
        for no, r in records:
            step = r.get(field_)
            if isinstance(step, int) and not isinstance(step, bool):
                groups.setdefault(step, []).append((f"{path.name}:{no}", r))
            else:
                bad.append(no)
        reader.warnings += _line_warnings(path.name, {f"no integer '{field_}' field": bad})
    elif chunk:
        labelled = [(f"{path.name}:{no}", r) for no, r in records]
        groups = {i // chunk: labelled[i : i + chunk] for i in range(0, len(labelled), chunk)}
    else:
        groups = {0: [(f"{path.name}:{no}", r) for no, r in records]}
    for step in sorted(groups):
        reader.add(groups[step], "rollout", step)


def require_path(path: Path) -> None:
    """The one-line error for a PATH that is neither a directory nor a file (checked before any reading)."""
    if not (path.is_dir() or path.is_file()):
        raise UserError(
            f"{path} does not exist: pass a run directory, a metrics.jsonl or a JSONL of responses"
        )


def diagnose(path: Path, cfg: DiagnoseConfig, *, progress: bool = False) -> Diagnosis:
    """Read PATH (run directory, metrics.jsonl or responses JSONL) and run the detector on its series.

    `progress` draws a bar (stderr) over the rollout files of a run directory.
    """
    path = Path(path)
    require_path(path)
    reader = _Reader(cfg)
    if path.is_dir():
        kind = "run"
        _read_run(path, reader, progress)
    else:
        records, warns = read_jsonl(path)
        reader.warnings += warns
        if not records:
            what = (
                "is empty"
                if not path.read_bytes().strip()
                else "is empty of records (no line is a JSON object)"
            )
            raise UserError(f"{path} {what}: nothing to diagnose")
        kind = _records_kind(records, cfg, path)
        if kind == "metrics":
            reader.series.update(_metrics_series(records, path.name, reader.warnings))
        else:
            _read_responses(path, records, reader)
    series = reader.series
    if not series:
        first = f" ({reader.warnings[0]})" if reader.warnings else ""
        raise UserError(f"{path} is empty of usable records{first}")
    steps = sorted({s for key in (TRUNC, REP, LENGTH) for s in series.get(key, {})})
    cols = [[series.get(key, {}).get(s) for s in steps] for key in (TRUNC, REP, LENGTH)]
    verdict = detect(steps, *cols, **cfg.thresholds())
    if verdict.verdict == "healthy":
        reader.warnings += level_warnings(series, cfg)
    if reader.responses and not reader.longer_than_tail:
        reader.warnings.append(
            f"no response is longer than rep_tail_chars={cfg.rep_tail_chars} characters, so none can count "
            "as repetitive; set a smaller diagnose.rep_tail_chars (L)"
        )
    unit = "words" if "words" in reader.units else "tokens"
    return Diagnosis(path, kind, series, verdict, reader.warnings, reader.examples(), unit)


def level_warnings(series: Mapping[str, Mapping[int, float]], cfg: DiagnoseConfig) -> list[str]:
    """Warnings for a truncation or repetition rate that is high over the last `inflation_window` steps.

    The detector looks for change; a run that truncates most of its rollouts from the first step never
    changes, and is called healthy, so the level is reported on its own."""
    out = []
    for key, name, what, advice in (
        (TRUNC, "high_trunc", "truncated", "the length budget (sampling.max_new_tokens) may be too small for "
         "this model and task, or the run was already truncating before the detector's window"),
        (REP, "high_rep", "repetitive", "check diagnose.rep_tail_chars (L) against the response lengths"),
    ):
        values = series.get(key) or {}
        last = [values[s] for s in sorted(values)[-cfg.inflation_window:]]
        level, limit = _median(last), getattr(cfg, name)
        if level is not None and level >= limit:
            out.append(f"{level:.0%} of responses are {what} (median of the last {len(last)} steps, at or above "
                       f"diagnose.{name}={limit:g}) although the rate did not change enough to call it "
                       f"inflation or collapse: {advice}")
    return out


def run_diagnose(
    path: Path, cfg: DiagnoseConfig, *, as_json: bool, plots_dir: Path | None, strict: bool, console
) -> int:
    """The `diagnose` stage: read, detect, report (terminal or JSON, plots, report.md); the exit code."""
    from stableopd import report  # matplotlib and rich stay out of the trainer's imports of this module

    diag = diagnose(Path(path), cfg, progress=console is not None)
    if plots_dir is None and diag.kind == "run":
        plots_dir = Path(path) / "report"
    written = report.write_report(diag, plots_dir) if plots_dir is not None else []
    if as_json:
        payload = diag.to_json() | {"report": [str(p) for p in written]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        report.print_report(diag, console, written)
    return 1 if strict and diag.verdict.verdict != "healthy" else 0
