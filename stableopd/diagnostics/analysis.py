"""Diagnose a run: read per-step series, then decide healthy / length inflation / truncation collapse.

Inputs (detected from PATH): a run directory (README, "Run directory": metrics.jsonl, rollouts/step_N.jsonl,
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

The detector and the live guard live in stableopd/core/detector.py; rendering in stableopd/diagnostics/report.py. With
several paths the CLI calls `compare.run_compare`, which diagnoses each path here with its own config and
puts the runs side by side; one path is `report.run_diagnose`.

Reading JSONL and the per-step sums over response records live in stableopd/diagnostics/series.py.

    stableopd diagnose RUN_DIR [--json] [--plots DIR] [--strict] [--text-field NAME]
    stableopd diagnose RUN_A RUN_B ... [--json] [--plots DIR] [--strict]
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stableopd.core.detector import (
    LENGTH,
    REP,
    TRUNC,
    Verdict,
    _median,
    _number,
    detect,
)
from stableopd.diagnostics.profile import step_profile
from stableopd.diagnostics.series import (
    LineProblems,
    ShownResponse,
    StepStats,
    iter_jsonl,
)
from stableopd.errors import UserError
from stableopd.files import check_input

if TYPE_CHECKING:  # the config is the stages' own; this package reads one section
    from stableopd.config import DiagnoseConfig

ROLLOUT_KEYS = (LENGTH, "rollout/length_max", TRUNC, REP, "rollout/rep_token_frac")
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


@dataclass
class Diagnosis:
    path: Path
    kind: Literal["run", "metrics", "responses"]
    series: dict[str, dict[int, float]]  # metric -> step -> value
    verdict: Verdict
    warnings: list[str]
    examples: list[ShownResponse]
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
            "profile": [asdict(row) for row in step_profile(self.series)],
        }


# ---------------------------------------------------------------- reading


def _metrics_series(
    records: Iterable[tuple[int, dict]], name: str, warnings: list[str]
) -> dict[str, dict[int, float]]:
    """metric -> step -> value from metrics.jsonl objects; non-numeric values are ignored."""
    series: dict[str, dict[int, float]] = {}
    no_step = LineProblems()
    for no, rec in records:
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            no_step.add("no integer 'step' field", no)
            continue
        for key, value in rec.items():
            if key != "step" and (x := _number(value)) is not None:
                series.setdefault(key, {})[step] = x
    warnings += no_step.warnings(name)
    return series


# ---------------------------------------------------------------- diagnose PATH


def _step_of(path: Path) -> int | None:
    m = _STEP_FILE.search(path.name)
    return int(m.group(1)) if m else None


def _merge(series: dict[str, dict[int, float]], metrics: Mapping[str, float], step: int) -> None:
    for key, value in metrics.items():
        series.setdefault(key, {}).setdefault(step, value)  # metrics.jsonl values win


@dataclass
class _Scan:
    """What a first pass over a JSONL found: record count, kinds of record, the first keys seen."""

    records: int = 0
    texts: bool = False
    metrics: bool = False
    steps: bool = False
    keys: tuple[str, ...] = ()


def _scan(path: Path, cfg: DiagnoseConfig, problems: LineProblems) -> _Scan:
    scan, keys = _Scan(), set()
    for _, r in iter_jsonl(path, problems, max_line_mb=cfg.max_line_mb):
        scan.records += 1
        scan.texts = scan.texts or isinstance(r.get(cfg.text_field), str)
        scan.steps = scan.steps or cfg.step_field in r
        scan.metrics = scan.metrics or ("step" in r and any("/" in k for k in r))
        if scan.records <= 50:
            keys |= set(r)
    scan.keys = tuple(sorted(keys)[:12])
    return scan


def _records_kind(scan: _Scan, cfg: DiagnoseConfig, path: Path) -> str:
    if scan.texts:
        return "responses"
    if scan.metrics:
        return "metrics"
    raise UserError(
        f"{path}: records have no text field '{cfg.text_field}' and no metrics (keys seen: {', '.join(scan.keys)}); "
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
        self._heap: list[tuple[tuple, int, ShownResponse]] = []  # min-heap of the worst examples so far
        self._order = itertools.count()  # tie-breaker: Examples do not compare

    def stats(self, prefix: str, step: int) -> StepStats:
        c = self.cfg
        return StepStats(
            prefix,
            text_field=c.text_field,
            finish_field=c.finish_field,
            truncated_field=c.truncated_field,
            tail_chars=c.rep_tail_chars,
            ratio=c.rep_ratio,
            ngram=c.rep_token_ngram,
            step=step,
        )

    def take(self, stats: StepStats, label: str, rec: Mapping) -> None:
        """Count one record into `stats`; keep its response if it is among the worst so far."""
        ex = stats.add(label, rec)
        if ex is None:
            return
        self.responses += 1
        self.longer_than_tail += len(ex.text) > self.cfg.rep_tail_chars
        if stats.prefix == "rollout" and self.cfg.examples:
            key = (ex.truncated is True, ex.repetitive, ex.ratio)
            if len(self._heap) < self.cfg.examples:
                heapq.heappush(self._heap, (key, next(self._order), ex))
            elif key > self._heap[0][0]:
                heapq.heapreplace(self._heap, (key, next(self._order), ex))

    def finish(self, stats: StepStats) -> None:
        metrics = stats.metrics()
        _merge(self.series, metrics, stats.step)
        self.warnings += stats.warnings
        if stats.more_warnings:
            self.warnings.append(f"{stats.more_warnings} more record warnings at step {stats.step}")
        if metrics:
            self.units.add(stats.unit)

    def add(self, records: Iterable[tuple[str, dict]], prefix: str, step: int) -> None:
        stats = self.stats(prefix, step)
        for label, rec in records:
            self.take(stats, label, rec)
        self.finish(stats)

    def add_file(self, path: Path, prefix: str, step: int) -> None:
        problems, where = LineProblems(), f"{path.parent.name}/{path.name}"
        self.add(
            ((f"{where}:{no}", r) for no, r in iter_jsonl(path, problems, max_line_mb=self.cfg.max_line_mb)),
            prefix,
            step,
        )
        self.warnings += [f"{path.parent.name}/{w}" for w in problems.warnings(path.name)]

    def examples(self) -> list[ShownResponse]:
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
        problems = LineProblems()
        records = iter_jsonl(metrics_path, problems, max_line_mb=reader.cfg.max_line_mb)
        reader.series.update(_metrics_series(records, metrics_path.name, reader.warnings))
        reader.warnings += problems.warnings(metrics_path.name)
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


def _read_responses(path: Path, reader: _Reader, *, by_step_field: bool) -> None:
    """Stream a responses file into per-step sums: memory holds one line and the sums, not the file."""
    field_, chunk = reader.cfg.step_field, reader.cfg.chunk_size
    no_step = LineProblems()
    steps: dict[int, StepStats] = {}
    records = iter_jsonl(path, LineProblems(), max_line_mb=reader.cfg.max_line_mb)  # warned on the first pass
    for i, (no, r) in enumerate(records):
        if by_step_field:
            step = r.get(field_)
            if not isinstance(step, int) or isinstance(step, bool):
                no_step.add(f"no integer '{field_}' field", no)
                continue
        else:
            step = i // chunk if chunk else 0
        if step not in steps:
            steps[step] = reader.stats("rollout", step)
        reader.take(steps[step], f"{path.name}:{no}", r)
    reader.warnings += no_step.warnings(path.name)
    for step in sorted(steps):
        reader.finish(steps[step])


def require_path(path: Path) -> None:
    """The one-line error for a PATH that is neither a directory nor a file (checked before any reading)."""
    if path.is_dir():
        return
    if path.exists() and not path.is_file():
        check_input(path, "diagnose input")  # a pipe or a device: says which
    if not path.is_file():
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
        problems = LineProblems()
        scan = _scan(path, cfg, problems)
        reader.warnings += problems.warnings(path.name)
        if not scan.records:
            what = "is empty" if not problems.kinds else "is empty of records (no line is a JSON object)"
            utf8 = "; it is not UTF-8 text" if problems.bad_utf8 else ""
            raise UserError(f"{path} {what}{utf8}: nothing to diagnose")
        kind = _records_kind(scan, cfg, path)
        if kind == "metrics":
            records = iter_jsonl(path, LineProblems(), max_line_mb=cfg.max_line_mb)
            reader.series.update(_metrics_series(records, path.name, reader.warnings))
        else:
            _read_responses(path, reader, by_step_field=scan.steps)
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
        (
            TRUNC,
            "high_trunc",
            "truncated",
            "the length budget (sampling.max_new_tokens) may be too small for "
            "this model and task, or the run was already truncating before the detector's window",
        ),
        (REP, "high_rep", "repetitive", "check diagnose.rep_tail_chars (L) against the response lengths"),
    ):
        values = series.get(key) or {}
        last = [values[s] for s in sorted(values)[-cfg.inflation_window :]]
        level, limit = _median(last), getattr(cfg, name)
        if level is not None and level >= limit:
            out.append(
                f"{level:.0%} of responses are {what} (median of the last {len(last)} steps, at or above "
                f"diagnose.{name}={limit:g}) although the rate did not change enough to call it "
                f"inflation or collapse: {advice}"
            )
    return out
