"""The `stableopd eval` stage: accuracy with real answer checking, of models or of existing responses.

    run_eval(cfg, *, models, step=None, responses=None, out=None, as_json=False, console=None) -> int

- `models`: model names (alias, hub id, local directory, `.gguf`) or run directories. A run directory
  (one with `checkpoints/`) is evaluated at its latest complete checkpoint (the highest `step_NNNNNN`
  holding a `COMPLETE` marker), or at `step`. Empty list and no `responses`: `cfg.student.name`.
  `stableopd eval RUN_DIR` (one run directory) starts from the run's own config.yaml (`run_config_base`):
  its model settings, template, system prompt, budgets and validation split, under `eval.preset` and the
  command line.
  Each model samples `eval.n` responses per problem at `eval.temperature` (0.6), `eval.top_p`, top-k off,
  at most `eval.max_new_tokens` (else `sampling.max_new_tokens`) tokens, seed `sampling.seed`.
- `responses`: a JSONL of existing generations (`prompt_id`, `response`, optional `sample_idx`, `n_tokens`,
  `truncated` / `finish_reason`); joined to the data by `prompt_id`, or by `prompt` text when a line has no
  id. Lines whose prompt is not in the data are counted and listed in `unknown_prompt_ids` (by id, or as
  `line N` when the line has no id), never dropped silently. Mutually exclusive with `models`.
- Problems come from `data.source` / `data.split` / `data.limit` (first `limit` problems, no shuffle), or
  from `eval.preset` (stableopd/eval/presets.py). Every scored problem needs a gold answer.
- Output: a rich table, one column per model (side by side); with `as_json` only the summary goes to
  stdout: one JSON object for one model, a JSON list of them for several. With `out`, the directory gets
  `samples.jsonl` (one line per sample: model, prompt_id, sample_idx, response, extracted, correct, gold,
  n_tokens, truncated, repetitive) and `summary.json` (the same object or list as `--json`).
  Returns the exit code (0).

Summary keys: `model`, `n` (problems scored), `samples`, `samples_per_problem`, `accuracy` (= avg@n = the
unbiased pass@1: mean over problems of correct/n), `pass@k` for each k in `eval.pass_k` that the samples
allow, `metric` ("avg@n" / "pass@1", the paper's name for `accuracy`), `answered_rate`, `length_mean`
(tokens; null when the responses file has none), `chars_mean`, `trunc_rate` (null when unknown),
`rep_rate` (the zlib rule with `diagnose.rep_tail_chars` / `diagnose.rep_ratio`), `unknown_prompt_ids`,
`problems_without_responses`, `checker`, `source`, `preset`.

Deviation: the paper evaluates at temperature 0.6 with avg@32 / pass@1 (the paper's section 6) but does not
state its response budget or answer extraction; ours are in stableopd/eval/answers.py.

    stableopd eval --model tiny --data problems.jsonl -s eval.n=4 -s eval.pass_k=[1,4] --out eval_out
"""

from __future__ import annotations

import gc
import json
import math
import statistics
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stableopd.config import Config, merge_trees
from stableopd.core.repetition import is_repetitive
from stableopd.data.sources import examples_for, read_jsonl
from stableopd.errors import UserError
from stableopd.eval.answers import Checker, check, get_checker
from stableopd.eval.presets import Preset, apply_preset, load_preset_examples
from stableopd.files import check_output_dir, check_output_file, write_jsonl_atomic, write_text_atomic
from stableopd.progress import console as stderr_console
from stableopd.progress import progress_bar
from stableopd.types import Example

MAX_LISTED_UNKNOWN = 20


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed exactly."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


# ---------------------------------------------------------------- loading problems and targets


def load_problems(cfg: Config, preset: Preset | None) -> list[Example]:
    d = cfg.data
    if preset is not None:
        return load_preset_examples(cfg, preset, limit=d.limit)
    return examples_for(d, limit=d.limit, shuffle=False)


def require_answers(examples: list[Example], *, source: str, answer_field: str) -> None:
    missing = [e.id for e in examples if e.answer is None]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(examples)} problems in '{source}' have no '{answer_field}' "
            f"value (first: id '{missing[0]}'); eval needs gold answers: set data.answer_field "
            "to the field that holds them"
        )


def _ckpt_step(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[-1])


def resolve_target(name: str, step: int | None) -> tuple[str, str]:
    """(label, what load_model gets) for a model name or a run directory."""
    p = Path(name).expanduser()
    if not (p.is_dir() and (p / "checkpoints").is_dir()):
        if step is not None:
            raise UserError(
                f"--step {step} needs a run directory (with checkpoints/), but '{name}' is a model"
            )
        return name, name
    from stableopd.engine.checkpoint import list_checkpoints  # imports torch: only for run directories

    ckpts = list_checkpoints(p)
    if not ckpts:
        raise UserError(f"run directory '{p}' has no complete checkpoint yet (checkpoints/step_*/COMPLETE)")
    if step is None:
        chosen = ckpts[-1]
    else:
        chosen = next((c for c in ckpts if _ckpt_step(c) == step), None)
        if chosen is None:
            steps = ", ".join(str(_ckpt_step(c)) for c in ckpts)
            raise UserError(f"run directory '{p}' has no complete checkpoint at step {step}; it has: {steps}")
    return f"{p.name}@step{_ckpt_step(chosen)}", str(chosen)


def run_config_base(targets: list[str], preset: str | None) -> dict[str, Any] | None:
    """The config a single run directory was trained with, as the base of its evaluation: its model
    settings, template, system prompt and budgets; its held-out split (data.val_source / val_split /
    val_limit) as the problems, or the preset's benchmark (whose keys then win over the run's); never its
    output path. None unless `targets` is exactly one run directory with a config.yaml."""
    from stableopd.config import read_yaml
    from stableopd.eval.presets import get_preset, preset_updates

    if len(targets) != 1:
        return None
    run = Path(targets[0]).expanduser()
    if not ((run / "checkpoints").is_dir() and (run / "config.yaml").is_file()):
        return None
    tree = read_yaml(run / "config.yaml")
    tree.pop("out", None)
    data = dict(tree.get("data") or {})
    data.update(
        source=data.get("val_source") or data.get("source", "builtin:arith"),
        split=data.get("val_split", "validation"),
        limit=data.get("val_limit"),
    )
    tree["data"] = data
    if preset:
        tree["data"]["limit"] = None
        tree = merge_trees(tree, preset_updates(get_preset(preset)))
    return tree


# ---------------------------------------------------------------- responses file


def read_responses(
    path: Path,
    examples: list[Example],
    *,
    response_field: str,
    max_file_mb: int = 4096,
    max_line_mb: int = 64,
) -> tuple[list[dict], list[str]]:
    """Rows of a responses file joined to problems -> (records with prompt_id, unknown ids / lines). The file
    is read whole, so it is held to `max_file_mb` (data.max_file_mb) like a data file."""
    rows = read_jsonl(path, what="responses file", max_file_mb=max_file_mb, max_line_mb=max_line_mb)
    if not rows:
        raise UserError(f"responses file '{path}' is empty: nothing to score")
    by_id = {e.id: e for e in examples}
    by_text: dict[str, Example] = {}
    for e in examples:
        by_text.setdefault(e.prompt, e)
    records, unknown, seen = [], [], defaultdict(int)
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row.get(response_field), str):
            raise UserError(
                f"{path}: response {lineno} has no text field '{response_field}' "
                f"(fields: {', '.join(row)}); set eval.response_field"
            )
        if row.get("prompt_id") is not None:
            ex = by_id.get(str(row["prompt_id"]))
            key = str(row["prompt_id"])
        else:
            ex = by_text.get(row["prompt"]) if isinstance(row.get("prompt"), str) else None
            key = f"line {lineno}"
        if ex is None:
            unknown.append(key)
            continue
        idx = row.get("sample_idx", seen[ex.id])
        seen[ex.id] += 1
        records.append({**row, "prompt_id": ex.id, "sample_idx": idx, "response": row[response_field]})
    if not records:
        raise UserError(
            f"none of the {len(rows)} responses in '{path}' match a problem of the data (unknown: "
            f"{', '.join(unknown[:5])}...); check --data, data.id_field and data.limit"
        )
    return records, unknown


# ---------------------------------------------------------------- scoring and summary


def _truncated(rec: dict) -> bool | None:
    if isinstance(rec.get("truncated"), bool):
        return rec["truncated"]
    if rec.get("finish_reason") in ("stop", "length"):
        return rec["finish_reason"] == "length"
    return None


def score_records(
    records: list[dict],
    examples: list[Example],
    checker: Checker,
    *,
    model: str,
    rep_tail_chars: int,
    rep_ratio: float,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One per-sample row (the samples.jsonl schema) for each record."""
    gold = {e.id: e.answer for e in examples}
    rows = []
    with progress_bar(
        f"checking {model}", total=len(records), enabled=progress and len(records) >= 200
    ) as adv:
        for rec in records:
            verdict = check(rec["response"], gold[rec["prompt_id"]], checker)
            repetitive, _ = is_repetitive(rec["response"], rep_tail_chars, rep_ratio)
            n_tok = rec.get("n_tokens")
            rows.append(
                {
                    "model": model,
                    "prompt_id": rec["prompt_id"],
                    "sample_idx": rec["sample_idx"],
                    "response": rec["response"],
                    "extracted": verdict.extracted,
                    "correct": verdict.correct,
                    "gold": gold[rec["prompt_id"]],
                    "n_tokens": n_tok if isinstance(n_tok, int) else None,
                    "truncated": _truncated(rec),
                    "repetitive": repetitive,
                }
            )
            adv(1)
    return rows


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def score(rows: list[dict[str, Any]], *, pass_k: list[int]) -> tuple[dict[str, Any], list[str]]:
    """Per-model summary of scored samples -> (summary, warnings)."""
    per_problem: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        per_problem[r["prompt_id"]].append(bool(r["correct"]))
    counts = [len(v) for v in per_problem.values()]
    lo, hi = min(counts), max(counts)
    summary: dict[str, Any] = {
        "n": len(per_problem),
        "samples": len(rows),
        "samples_per_problem": lo if lo == hi else [lo, hi],
        "accuracy": statistics.fmean(sum(v) / len(v) for v in per_problem.values()),
        "metric": "pass@1" if hi == 1 else f"avg@{hi}" if lo == hi else f"avg@{lo}-{hi}",
    }
    warnings = []
    for k in sorted(set(pass_k)):
        if k > lo:
            warnings.append(f"pass@{k} skipped: some problems have only {lo} samples")
            continue
        summary[f"pass@{k}"] = statistics.fmean(pass_at_k(len(v), sum(v), k) for v in per_problem.values())
    trunc = [r["truncated"] for r in rows]
    summary.update(
        {
            "answered_rate": statistics.fmean(r["extracted"] is not None for r in rows),
            "length_mean": _mean([r["n_tokens"] for r in rows]),
            "chars_mean": statistics.fmean(len(r["response"]) for r in rows),
            "trunc_rate": None if any(t is None for t in trunc) else statistics.fmean(trunc),
            "rep_rate": statistics.fmean(r["repetitive"] for r in rows),
        }
    )
    return summary, warnings


# ---------------------------------------------------------------- generation


def generate_records(
    cfg: Config, model_ref: str, examples: list[Example], *, label: str, progress: bool
) -> list[dict[str, Any]]:
    """Load one model, sample eval.n responses per problem, free the model."""
    from stableopd.stages.build import eval_sampling
    from stableopd.stages.rollout import sample_model

    params = eval_sampling(cfg, seed=cfg.sampling.seed)
    records = sample_model(cfg, model_ref, examples, params, progress=progress, label=f"sampling {label}")
    gc.collect()
    return [r.to_json() for r in records]  # scored like the rows of a responses file


# ---------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) <= 1 else f"{value:.1f}"
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    return str(value)


def render_table(summaries: list[dict[str, Any]]) -> Table:
    """Metrics as rows, one column per model."""
    first = summaries[0]
    table = Table(
        title=escape(f"eval on {first['source']}" + (f" ({first['preset']})" if first["preset"] else ""))
    )
    table.add_column("metric")
    for s in summaries:
        table.add_column(escape(s["model"]), justify="right")
    keys = ["n", "samples_per_problem", "metric", "accuracy"]
    keys += sorted({k for s in summaries for k in s if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    keys += [
        "answered_rate",
        "length_mean",
        "chars_mean",
        "trunc_rate",
        "rep_rate",
        "problems_without_responses",
    ]
    for key in keys:
        table.add_row(key, *(_fmt(s.get(key)) for s in summaries))
    return table


def write_outputs(out: Path, rows: list[dict[str, Any]], payload: Any) -> None:
    write_jsonl_atomic(out / "samples.jsonl", rows)
    write_text_atomic(out / "summary.json", json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------- the stage


def _evaluate_one(
    cfg: Config,
    records: list[dict],
    examples: list[Example],
    *,
    label: str,
    unknown: list[str],
    progress: bool,
) -> tuple[dict, list[dict], list[str]]:
    checker = get_checker(cfg.eval.checker)
    rows = score_records(
        records,
        examples,
        checker,
        model=label,
        rep_tail_chars=cfg.diagnose.rep_tail_chars,
        rep_ratio=cfg.diagnose.rep_ratio,
        progress=progress,
    )
    summary, warnings = score(rows, pass_k=cfg.eval.pass_k)
    scored = {r["prompt_id"] for r in rows}
    summary = {
        "model": label,
        **summary,
        "unknown_prompt_ids": unknown,
        "problems_without_responses": sum(e.id not in scored for e in examples),
        "checker": checker.name,
        "source": cfg.data.source,
        "preset": cfg.eval.preset,
    }
    if unknown:
        listed = ", ".join(unknown[:MAX_LISTED_UNKNOWN]) + (
            " ..." if len(unknown) > MAX_LISTED_UNKNOWN else ""
        )
        warnings.append(
            f"{len(unknown)} responses name prompts that are not in the data, not scored: {listed}"
        )
    if summary["problems_without_responses"]:
        warnings.append(
            f"{summary['problems_without_responses']} problems of the data have no response; "
            "accuracy is over the problems that have one"
        )
    return summary, rows, warnings


def run_eval(
    cfg: Config,
    *,
    models: list[str],
    step: int | None = None,
    responses: Path | None = None,
    out: Path | None = None,
    as_json: bool = False,
    console: Console | None = None,
) -> int:
    """The `eval` command: see the module docstring for arguments, outputs and summary keys."""
    console = console or stderr_console
    cfg, preset = apply_preset(cfg)
    get_checker(cfg.eval.checker)  # fail on a bad name before any loading
    if out is not None:
        check_output_dir(Path(out), "eval output folder")
        for name in ("samples.jsonl", "summary.json"):
            check_output_file(Path(out) / name, "eval output")
    if responses is not None and models:
        raise UserError("pass either --responses or --model, not both: responses are scored without a model")
    if responses is None and (bad := [k for k in cfg.eval.pass_k if k > cfg.eval.n]):
        raise UserError(
            f"eval.pass_k has k={bad[0]} but eval.n={cfg.eval.n} samples per problem; "
            "k must be at most n: raise eval.n or drop that k"
        )
    examples = load_problems(cfg, preset)
    progress = cfg.logging.progress  # bars go to stderr, so --json output on stdout stays clean
    results: list[tuple[dict, list[dict], list[str]]] = []
    if responses is not None:
        records, unknown = read_responses(
            Path(responses),
            examples,
            response_field=cfg.eval.response_field,
            max_file_mb=cfg.data.max_file_mb,
            max_line_mb=cfg.data.max_line_mb,
        )
        scored_ids = {r["prompt_id"] for r in records}
        require_answers(
            [e for e in examples if e.id in scored_ids],
            source=cfg.data.source,
            answer_field=cfg.data.answer_field,
        )
        results.append(
            _evaluate_one(
                cfg, records, examples, label=Path(responses).name, unknown=unknown, progress=progress
            )
        )
    else:
        require_answers(examples, source=cfg.data.source, answer_field=cfg.data.answer_field)
        for label, ref in [resolve_target(m, step) for m in (models or [cfg.student.name])]:
            records = generate_records(cfg, ref, examples, label=label, progress=progress)
            results.append(_evaluate_one(cfg, records, examples, label=label, unknown=[], progress=progress))
    summaries = [r[0] for r in results]
    payload: Any = summaries[0] if len(summaries) == 1 else summaries
    if out is not None:
        write_outputs(Path(out), [row for r in results for row in r[1]], payload)
    for warning in (w for r in results for w in r[2]):
        stderr_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if as_json:
        print(json.dumps(payload, indent=2))
    else:
        console.print(render_table(summaries))
    return 0
