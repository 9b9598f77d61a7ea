"""Render a `Diagnosis`: a rich terminal report, PNG plots, report.md and diagnosis.json.

The terminal report shows the verdict and onset, each key series as a sparkline with its first / min /
max / last values, a compact table of selected steps (evenly spaced, plus the steps around the onset),
the worst examples (most repetitive responses, truncated ones first) with the looping span from
`repetition.repeating_span` highlighted, and the reading warnings. Plots are drawn on a bare matplotlib
`Figure` (Agg canvas, no pyplot state), one PNG per panel, with the onset as a dashed vertical line.
Nothing here is in the paper; the panels mirror the paper's figures (length, truncation, repetition,
repetitive vs regular advantage, accuracy, log-probs vs step).

    stableopd diagnose RUN_DIR --plots RUN_DIR/report
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stableopd.diagnostics import Diagnosis, Example
from stableopd.repetition import repeating_span

# (file stem, title, y label, series keys); a panel is drawn when at least one of its keys has values
PANELS = [
    ("length", "Response length", "length", ["rollout/length_mean", "rollout/length_max", "val/length_mean"]),
    ("truncation", "Truncation rate", "fraction truncated", ["rollout/trunc_rate", "val/trunc_rate"]),
    ("repetition", "Repetition", "fraction", ["rollout/rep_rate", "rollout/rep_token_frac", "val/rep_rate"]),
    ("advantage", "Advantage: repetitive vs regular tokens", "advantage", ["adv/repetitive_mean", "adv/regular_mean", "adv/mean"]),
    ("accuracy", "Validation accuracy", "accuracy", ["val/accuracy"]),
    ("logprobs", "Mean log-prob of sampled tokens", "log-prob", ["teacher/logprob_mean", "student/logprob_mean"]),
]  # fmt: skip
TABLE_KEYS = [
    ("length", "rollout/length_mean"),
    ("trunc", "rollout/trunc_rate"),
    ("rep", "rollout/rep_rate"),
    ("rep tok", "rollout/rep_token_frac"),
    ("adv rep", "adv/repetitive_mean"),
    ("adv reg", "adv/regular_mean"),
    ("val acc", "val/accuracy"),
]
VERDICT_STYLE = {"healthy": "bold green", "inflation": "bold yellow", "collapse": "bold red"}
_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """Values resampled to at most `width` bars (bucket means), scaled between their min and max."""
    if not values:
        return ""
    if len(values) > width:
        edges = [round(i * len(values) / width) for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in itertools.pairwise(edges)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(7, int((v - lo) / (hi - lo) * 8))] for v in values)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.0f}"


def select_steps(steps: list[int], onset: int | None, rows: int = 12) -> list[int]:
    """About `rows` steps: evenly spaced over the run, plus two before and after the onset."""
    if len(steps) <= rows:
        return list(steps)
    picked = {steps[round(i * (len(steps) - 1) / (rows - 1))] for i in range(rows)}
    if onset is not None and onset in steps:
        i = steps.index(onset)
        picked |= set(steps[max(0, i - 2) : i + 3])
    return sorted(picked)


def highlight_tail(text: str, max_chars: int = 600) -> Text:
    """The last `max_chars` characters of `text`, with the looping span (if any) in reverse red."""
    span = repeating_span(text)
    start = max(0, len(text) - max_chars)
    out = Text("…" if start else "", style="dim")
    if span is None or span[1] <= start:
        out.append(text[start:])
        return out
    a, b = max(span[0], start), span[1]
    out.append(text[start:a])
    out.append(text[a:b], style="reverse red")
    out.append(text[b:])
    return out


def _example_panel(ex: Example) -> Panel:
    flags = ", ".join(name for name, on in (("truncated", ex.truncated), ("repetitive", ex.repetitive)) if on)
    title = f"{ex.source}  step {ex.step}  zlib ratio {ex.ratio:.1f}" + (f"  [{flags}]" if flags else "")
    return Panel(highlight_tail(ex.text), title=Text(title), title_align="left", border_style="dim")


def _series_table(diag: Diagnosis) -> Table:
    table = Table(title="Series at a glance", title_justify="left", box=None, pad_edge=False)
    for col in ("metric", "trend", "first", "min", "max", "last"):
        table.add_column(col, justify="left" if col in ("metric", "trend") else "right")
    for _, _, _, keys in PANELS:
        for key in keys:
            values = diag.series.get(key)
            if values:
                ys = [values[s] for s in sorted(values)]
                table.add_row(key, sparkline(ys), *(_fmt(v) for v in (ys[0], min(ys), max(ys), ys[-1])))
    return table


def _steps_table(diag: Diagnosis) -> Table:
    onset = diag.verdict.onset_step
    keys = [(name, key) for name, key in TABLE_KEYS if diag.series.get(key)]
    table = Table(title="Selected steps", title_justify="left", box=None, pad_edge=False)
    table.add_column("step", justify="right")
    for name, _ in keys:
        table.add_column(name, justify="right")
    for step in select_steps(diag.steps, onset):
        style = VERDICT_STYLE[diag.verdict.verdict] if step == onset else ""
        table.add_row(str(step), *(_fmt(diag.series[k].get(step)) for _, k in keys), style=style)
    return table


def print_report(diag: Diagnosis, console: Console | None, written: list[Path] | None = None) -> None:
    """The terminal report (on a new stdout console when None); `written`: files from `write_report`."""
    console = console or Console()
    steps = diag.steps
    span = f"steps {steps[0]}..{steps[-1]}" if steps else "no steps"
    console.print(
        Text.assemble(
            ("stableopd diagnose ", "bold"), f"{diag.path}  ({diag.kind}, {len(steps)} steps, {span})"
        )
    )
    v = diag.verdict
    head = Text(v.verdict.upper(), style=VERDICT_STYLE[v.verdict])
    if v.onset_step is not None:
        head.append(f"   onset at step {v.onset_step}")
    body = Text("\n").join([head, *(Text(f"- {r}") for r in v.reasons)])
    console.print(Panel(body, title="verdict", title_align="left"))
    console.print(_series_table(diag))
    console.print(_steps_table(diag))
    console.print(f"length unit: {diag.length_unit}")
    if diag.examples:
        console.print(
            "[bold]Worst examples[/] (truncated first, then repetitive, then by zlib ratio; loop in red)"
        )
        for ex in diag.examples:
            console.print(_example_panel(ex))
    for w in diag.warnings[:20]:
        console.print(Text.assemble(("warning: ", "yellow"), w))
    if len(diag.warnings) > 20:
        console.print(f"[yellow]warning:[/] {len(diag.warnings) - 20} more (see --json)")
    for p in written or []:
        console.print(Text(f"wrote {p}"), soft_wrap=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_plots(diag: Diagnosis, out_dir: Path) -> list[Path]:
    """One PNG per panel that has data, with the onset marked; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onset, verdict = diag.verdict.onset_step, diag.verdict.verdict
    written = []
    for stem, title, ylabel, keys in PANELS:
        present = [k for k in keys if diag.series.get(k)]
        if not present:
            continue
        fig = Figure(figsize=(7, 3.6), dpi=110)
        ax = fig.subplots()
        for key in present:
            xs = sorted(diag.series[key])
            ax.plot(xs, [diag.series[key][x] for x in xs], marker="." if len(xs) < 60 else None, label=key)
        if onset is not None:
            ax.axvline(
                onset, color="red", linestyle="--", linewidth=1, label=f"{verdict} onset (step {onset})"
            )
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        tmp.replace(path)
        written.append(path)
    return written


def write_markdown(diag: Diagnosis, out_dir: Path, pngs: list[Path]) -> Path:
    """report.md: verdict, onset, reasons, final values, warnings, and the plots as images."""
    v, final = diag.verdict, diag.final()
    lines = [
        f"# stableopd diagnose: {v.verdict}",
        "",
        f"- source: `{diag.path}` ({diag.kind}, {len(diag.steps)} steps)",
        f"- verdict: **{v.verdict}**",
        f"- onset step: {v.onset_step if v.onset_step is not None else 'none'}",
        *(f"- {r}" for r in v.reasons),
        f"- last step: truncation {_fmt(final['trunc_rate'])}, repetition {_fmt(final['rep_rate'])}, "
        f"mean length {_fmt(final['length_mean'])} {diag.length_unit}",
        "",
    ]
    for p in pngs:
        lines += [f"## {p.stem}", "", f"![{p.stem}]({p.name})", ""]
    if diag.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in diag.warnings), ""]
    path = out_dir / "report.md"
    _write_atomic(path, "\n".join(lines))
    return path


def write_report(diag: Diagnosis, out_dir: Path) -> list[Path]:
    """PNG plots, report.md and diagnosis.json under `out_dir`; returns every path written."""
    out_dir = Path(out_dir)
    pngs = write_plots(diag, out_dir)
    md = write_markdown(diag, out_dir, pngs)
    js = out_dir / "diagnosis.json"
    _write_atomic(js, json.dumps(diag.to_json(), indent=2) + "\n")
    return [*pngs, md, js]
