"""Render diagnoses: a rich terminal report, PNG plots, report.md and diagnosis.json for one run, and the
plot and markdown pieces that `compare` reuses for several.

The terminal report shows the verdict and onset, each key series as a sparkline with its first / min /
max / last values, a compact table of selected steps (evenly spaced, plus the steps around the onset),
the worst examples (most repetitive responses, truncated ones first) with the looping span from
`repetition.repeating_span` highlighted, and the reading warnings. Plots are drawn on a bare matplotlib
`Figure` (Agg canvas, no pyplot state), one PNG per panel, by one function (`_figure`) for both kinds:
a single run's panels (PANELS: its series, the onset as a red dashed line, adv/mean drawn thin under the
repetitive/regular split) and overlays of several runs (OVERLAY_PANELS: one colour per run, its onset a
dashed line in that colour). Nothing here is in the paper; the panels mirror the paper's figures (length,
truncation, repetition, repetitive vs regular advantage, accuracy, log-probs vs step) plus the training
curves (loss, gradient norm, validation reverse KL).

    stableopd diagnose RUN_DIR --plots RUN_DIR/report
    stableopd diagnose RUN_A RUN_B --plots compare/      (overlays, via stableopd/diagnostics/compare.py)
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stableopd.core.repetition import repeating_span
from stableopd.diagnostics.analysis import Diagnosis, ShownResponse, diagnose
from stableopd.diagnostics.profile import step_profile
from stableopd.files import atomic_path, check_output_dir, write_text_atomic

if TYPE_CHECKING:  # the config is the stages' own; this package reads one section
    from stableopd.config import DiagnoseConfig

Line = tuple[dict[int, float], dict[str, Any]]  # (step -> value, matplotlib plot style)

# (file stem, title, y label, series keys); a panel is drawn when at least one of its keys has values.
# The signal panels are the paper's figures and also the terminal's series table; the training panels are
# plots only, to keep the terminal report on the collapse signals.
SIGNAL_PANELS = [
    ("length", "Response length", "length", ["rollout/length_mean", "rollout/length_max", "val/length_mean"]),
    ("truncation", "Truncation rate", "fraction truncated", ["rollout/trunc_rate", "val/trunc_rate"]),
    ("repetition", "Repetition", "fraction", ["rollout/rep_rate", "rollout/rep_token_frac", "val/rep_rate"]),
    ("advantage", "Advantage: repetitive vs regular tokens", "advantage", ["adv/repetitive_mean", "adv/regular_mean", "adv/mean"]),
    ("accuracy", "Validation accuracy", "accuracy", ["val/accuracy"]),
    ("logprobs", "Mean log-prob of sampled tokens", "log-prob", ["teacher/logprob_mean", "student/logprob_mean"]),
]  # fmt: skip
TRAINING_PANELS = [
    ("loss", "Loss", "loss", ["loss/total", "loss/opd", "loss/jsd", "loss/gold_sft", "loss/ref_kl"]),
    ("grad_norm", "Gradient norm (before clipping)", "norm", ["optim/grad_norm"]),
    ("reverse_kl", "Validation reverse KL (student to teacher)", "KL", ["val/reverse_kl"]),
]  # fmt: skip
PANELS = SIGNAL_PANELS + TRAINING_PANELS
# adv/mean is the token-weighted mix of the split and mostly equals adv/regular_mean: a thin dotted grey line
# under the split keeps the regular line visible
KEY_STYLE = {"adv/mean": {"color": "0.5", "linestyle": ":", "linewidth": 1, "zorder": 1}}
# overlays: one colour per run, so keys that share a panel differ by line style
OVERLAY_PANELS = [
    ("truncation", "Rollout truncation rate", "fraction truncated", ["rollout/trunc_rate"]),
    ("repetition", "Rollout repetition rate", "fraction repetitive", ["rollout/rep_rate"]),
    ("length", "Rollout length (mean)", "length", ["rollout/length_mean"]),
    ("accuracy", "Validation accuracy", "accuracy", ["val/accuracy"]),
    ("advantage", "Advantage: repetitive (solid) vs regular (dashed) tokens", "advantage", ["adv/repetitive_mean", "adv/regular_mean"]),
    ("val_truncation", "Validation truncation rate", "fraction truncated", ["val/trunc_rate"]),
]  # fmt: skip
OVERLAY_STYLE = {"adv/regular_mean": "--"}
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


def fmt(x: float | None) -> str:
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


def _example_panel(ex: ShownResponse) -> Panel:
    flags = ", ".join(name for name, on in (("truncated", ex.truncated), ("repetitive", ex.repetitive)) if on)
    title = f"{ex.source}  step {ex.step}  zlib ratio {ex.ratio:.1f}" + (f"  [{flags}]" if flags else "")
    return Panel(highlight_tail(ex.text), title=Text(title), title_align="left", border_style="dim")


def _series_table(diag: Diagnosis) -> Table:
    table = Table(title="Series at a glance", title_justify="left", box=None, pad_edge=False)
    for col in ("metric", "trend", "first", "min", "max", "last"):
        table.add_column(col, justify="left" if col in ("metric", "trend") else "right")
    for _, _, _, keys in SIGNAL_PANELS:
        for key in keys:
            values = diag.series.get(key)
            if values:
                ys = [values[s] for s in sorted(values)]
                table.add_row(key, sparkline(ys), *(fmt(v) for v in (ys[0], min(ys), max(ys), ys[-1])))
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
        table.add_row(str(step), *(fmt(diag.series[k].get(step)) for _, k in keys), style=style)
    return table


def _profile_table(diag: Diagnosis) -> Table | None:
    rows = step_profile(diag.series)
    if not rows:
        return None
    table = Table(title="Time per step (seconds)", title_justify="left", box=None, pad_edge=False)
    for col in ("part", "median", "mean", "share"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for r in rows:
        table.add_row(
            r.part,
            f"{r.median_s:.3f}",
            f"{r.mean_s:.3f}",
            f"{100 * r.share:.0f}%",
            style="bold" if r.part == "step" else "",
        )
    return table


def markdown_profile(diag: Diagnosis) -> list[str]:
    rows = step_profile(diag.series)
    if not rows:
        return []
    return [
        "## Time per step",
        "",
        "| part | median s | mean s | share |",
        "|---|---|---|---|",
        *(f"| {r.part} | {r.median_s:.3f} | {r.mean_s:.3f} | {100 * r.share:.0f}% |" for r in rows),
        "",
    ]


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
    if (profile := _profile_table(diag)) is not None:
        console.print(profile)
    console.print(f"length unit: {diag.length_unit}")
    if diag.examples:
        console.print(
            "[bold]Worst examples[/] (truncated first, then repetitive, then by zlib ratio; loop in red)"
        )
        for ex in diag.examples:
            console.print(_example_panel(ex))
    print_warnings(console, diag.warnings)
    print_written(console, written or [])


def print_warnings(console: Console, warnings: list[str], prefix: str = "", limit: int = 20) -> None:
    """The first `limit` warnings, each after `prefix`, then how many more there are."""
    for w in warnings[:limit]:
        console.print(Text.assemble(("warning: ", "yellow"), prefix, w))
    if len(warnings) > limit:
        console.print(
            Text.assemble(("warning: ", "yellow"), f"{prefix}{len(warnings) - limit} more (see --json)")
        )


def print_written(console: Console, written: list[Path]) -> None:
    for p in written:
        console.print(Text(f"wrote {p}"), soft_wrap=True)


def _figure(title: str, ylabel: str, lines: list[Line], onsets: list[tuple[int, dict]]) -> Figure:
    """One panel: `lines` are (step -> value, plot style) pairs, `onsets` dashed vertical lines."""
    fig = Figure(figsize=(7, 3.6), dpi=110)
    ax = fig.subplots()
    for values, style in lines:
        xs = sorted(values)
        ax.plot(xs, [values[x] for x in xs], marker="." if len(xs) < 60 else None, **style)
    for step, style in onsets:
        ax.axvline(step, linestyle="--", linewidth=1, **style)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def panel_figures(diag: Diagnosis) -> dict[str, Figure]:
    """File stem -> figure for every panel of PANELS that has data, with the onset in red."""
    v = diag.verdict
    label = f"{v.verdict} onset (step {v.onset_step})"
    onsets = [] if v.onset_step is None else [(v.onset_step, {"color": "red", "label": label})]
    figures = {}
    for stem, title, ylabel, keys in PANELS:
        lines = [(diag.series[k], {"label": k} | KEY_STYLE.get(k, {})) for k in keys if diag.series.get(k)]
        if lines:
            figures[stem] = _figure(title, ylabel, lines, onsets)
    return figures


def _run_lines(diag: Diagnosis, name: str, color: str, keys: list[str]) -> list[Line]:
    """One run's lines in an overlay: its colour, a line style per key, its name on the first line only."""
    present = [k for k in keys if diag.series.get(k)]
    labels = [name] + ["_nolegend_"] * len(present)
    return [
        (diag.series[k], {"color": color, "linestyle": OVERLAY_STYLE.get(k, "-"), "label": label})
        for k, label in zip(present, labels)
    ]


def overlay_figures(diags: list[Diagnosis], names: list[str]) -> dict[str, Figure]:
    """File stem -> figure for every OVERLAY_PANELS panel that some run has: a colour per run (the same in
    every panel), its name in the legend, its onset as a dashed vertical line in its colour."""
    figures = {}
    for stem, title, ylabel, keys in OVERLAY_PANELS:
        lines, onsets = [], []
        for i, (diag, name) in enumerate(zip(diags, names, strict=True)):
            color = f"C{i % 10}"
            run_lines = _run_lines(diag, name, color, keys)
            lines += run_lines
            if run_lines and diag.verdict.onset_step is not None:
                onsets.append((diag.verdict.onset_step, {"color": color, "alpha": 0.8}))
        if lines:
            figures[stem] = _figure(title, ylabel, lines, onsets)
    return figures


def write_figures(figures: dict[str, Figure], out_dir: Path) -> list[Path]:
    """Each figure as out_dir/STEM.png (temp file + rename); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        path = out_dir / f"{stem}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
        written.append(path)
    return written


def write_plots(diag: Diagnosis, out_dir: Path) -> list[Path]:
    """One PNG per panel that has data, with the onset marked; returns the paths written."""
    return write_figures(panel_figures(diag), out_dir)


def markdown_images(pngs: list[Path]) -> list[str]:
    return [line for p in pngs for line in (f"## {p.stem}", "", f"![{p.stem}]({p.name})", "")]


def markdown_warnings(warnings: list[str]) -> list[str]:
    return ["## Warnings", "", *(f"- {w}" for w in warnings), ""] if warnings else []


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
        f"- last step: truncation {fmt(final['trunc_rate'])}, repetition {fmt(final['rep_rate'])}, "
        f"mean length {fmt(final['length_mean'])} {diag.length_unit}",
        "",
    ]
    lines += markdown_images(pngs) + markdown_profile(diag) + markdown_warnings(diag.warnings)
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def write_report(diag: Diagnosis, out_dir: Path) -> list[Path]:
    """PNG plots, report.md and diagnosis.json under `out_dir`; returns every path written."""
    out_dir = Path(out_dir)
    pngs = write_plots(diag, out_dir)
    md = write_markdown(diag, out_dir, pngs)
    js = out_dir / "diagnosis.json"
    write_text_atomic(js, json.dumps(diag.to_json(), indent=2) + "\n")
    return [*pngs, md, js]


def run_diagnose(
    path: Path, cfg: DiagnoseConfig, *, as_json: bool, plots_dir: Path | None, strict: bool, console
) -> int:
    """The `diagnose` stage: read, detect, report (terminal or JSON, plots, report.md); the exit code."""
    if plots_dir is None and Path(path).is_dir():
        plots_dir = Path(path) / "report"
    if plots_dir is not None:
        check_output_dir(plots_dir, "plots folder")  # before reading: a bad --plots costs no time
    diag = diagnose(Path(path), cfg, progress=console is not None)
    written = write_report(diag, plots_dir) if plots_dir is not None else []
    if as_json:
        payload = diag.to_json() | {"report": [str(p) for p in written]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        print_report(diag, console, written)
    return 1 if strict and diag.verdict.verdict != "healthy" else 0
