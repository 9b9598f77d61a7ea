"""Compare runs side by side: `stableopd diagnose RUN_A RUN_B ...` (one PATH: `report.run_diagnose`).

Each path is diagnosed on its own with its own `DiagnoseConfig` (the CLI starts each from that run
directory's config.yaml, so each keeps its repetition L and tau), then summarised as one row: verdict,
onset, steps read, first / best / last `val/accuracy`, the last step's truncation rate, repetition rate and
mean length, and the mean of `adv/repetitive_mean` and `adv/regular_mean` from the onset on (over the whole
run when there is none). The paper's Figure 4 plots that split over steps; the table averages it over the
steps where the collapse is under way, where the two diverge (the overlay plot keeps the curves).

Output: the table and each run's warnings (prefixed with its name) on the terminal, or `--json`; under the
plots folder (default ./diagnose-compare, created) overlay PNGs with one colour per run and its onset as a
dashed line (report.OVERLAY_PANELS), report.md with the table and the images, and comparison.json. Every
path is read before anything is written, so a bad path leaves no files behind.

    stableopd diagnose runs/opd runs/stableopd --plots runs/compare --strict
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from stableopd.diagnostics import report
from stableopd.diagnostics.analysis import Diagnosis, diagnose, require_path
from stableopd.files import check_output_dir, write_text_atomic

if TYPE_CHECKING:  # the config is the stages' own; this package reads one section
    from stableopd.config import DiagnoseConfig

DEFAULT_DIR = Path("diagnose-compare")
COLUMNS = [  # (header, row key)
    ("run", "name"), ("verdict", "verdict"), ("onset", "onset_step"), ("steps", "steps"),
    ("acc first", "acc_first"), ("acc best", "acc_best"), ("acc last", "acc_last"),
    ("trunc", "trunc_rate"), ("rep", "rep_rate"), ("len", "length_mean"),
    ("adv rep", "adv_repetitive_mean"), ("adv reg", "adv_regular_mean"),
]  # fmt: skip
ALWAYS = {"name", "verdict", "onset_step", "steps"}  # other columns show only when some run has a value
ADV_NOTE = (
    "trunc / rep / len: last step; adv rep / adv reg: mean advantage of repetitive / regular tokens "
    "from the onset on (whole run without an onset)"
)


def _label_parts(path: Path) -> tuple[str, ...]:
    """What a run is named after: its directory, the folder of a metrics.jsonl, else the file's stem."""
    path = path.resolve()
    if path.name == "metrics.jsonl":
        return path.parent.parts
    return path.with_suffix("").parts if path.is_file() else path.parts


def run_names(paths: Sequence[Path]) -> list[str]:
    """Each run's folder name; names that clash take parent folders until they differ, then " (2)", ..."""
    parts = [_label_parts(Path(p)) for p in paths]
    names = [ps[-1] for ps in parts]
    for depth in range(2, max(map(len, parts)) + 1):
        clash = {n for n in names if len({ps for ps, m in zip(parts, names) if m == n}) > 1}
        if not clash:
            break
        names = ["/".join(ps[-depth:]) if n in clash else n for n, ps in zip(names, parts)]
    seen: Counter[str] = Counter()
    out = []
    for n in names:  # still equal: the same run given twice
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _mean_from(values: dict[int, float] | None, start: int | None) -> float | None:
    xs = [v for s, v in (values or {}).items() if start is None or s >= start]
    return sum(xs) / len(xs) if xs else None


def table_row(diag: Diagnosis, name: str) -> dict[str, Any]:
    """One comparison row, keyed as COLUMNS (None where a run lacks the series)."""
    onset = diag.verdict.onset_step
    acc = diag.series.get("val/accuracy") or {}
    accs = [acc[s] for s in sorted(acc)]
    first, best, last = (accs[0], max(accs), accs[-1]) if accs else (None, None, None)
    return {
        "name": name, "verdict": diag.verdict.verdict, "onset_step": onset, "steps": len(diag.steps),
        "acc_first": first, "acc_best": best, "acc_last": last, **diag.final(),
        "adv_repetitive_mean": _mean_from(diag.series.get("adv/repetitive_mean"), onset),
        "adv_regular_mean": _mean_from(diag.series.get("adv/regular_mean"), onset),
    }  # fmt: skip


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else str(value) if isinstance(value, int) else report.fmt(value)


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cell texts of the comparison table, shared by the terminal and report.md."""
    cols = [(h, k) for h, k in COLUMNS if k in ALWAYS or any(r[k] is not None for r in rows)]
    return [h for h, _ in cols], [[_cell(r[k]) for _, k in cols] for r in rows]


def _rich_table(rows: list[dict[str, Any]]) -> Table:
    headers, cells = table_cells(rows)
    table = Table(title=f"stableopd diagnose: {len(rows)} runs", caption=ADV_NOTE, box=None, pad_edge=False,
                  collapse_padding=True, title_justify="left", caption_justify="left")  # fmt: skip
    for h in headers:  # on a narrow terminal a long run name folds; headers take two lines, cells never wrap
        table.add_column(h.replace(" ", "\n"), justify="left" if h in ("run", "verdict") else "right",
                         overflow="fold", no_wrap=h != "run")  # fmt: skip
    for line in cells:  # Text, not markup: a run name may hold "[...]"
        table.add_row(*(Text(c, style=report.VERDICT_STYLE.get(c, "")) for c in line))
    return table


def print_comparison(
    rows: list[dict[str, Any]], diags: list[Diagnosis], console: Console | None, written: list[Path]
) -> None:
    """The table, then each run's warnings after its name, then the files written."""
    console = console or Console()
    console.print(_rich_table(rows))
    for row, diag in zip(rows, diags, strict=True):
        report.print_warnings(console, diag.warnings, prefix=f"{row['name']}: ")
    report.print_written(console, written)


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    headers, cells = table_cells(rows)
    return [f"| {' | '.join(line)} |" for line in (headers, ["---"] * len(headers), *cells)]


def _payload(diags: list[Diagnosis], names: list[str]) -> list[dict[str, Any]]:
    return [diag.to_json() | {"name": name} for diag, name in zip(diags, names, strict=True)]


def write_comparison(
    diags: list[Diagnosis], names: list[str], rows: list[dict[str, Any]], out_dir: Path
) -> list[Path]:
    """Overlay PNGs, report.md (table, images, warnings) and comparison.json; returns every path written."""
    pngs = report.write_figures(report.overlay_figures(diags, names), out_dir)
    warnings = [f"{name}: {w}" for diag, name in zip(diags, names, strict=True) for w in diag.warnings]
    lines = [f"# stableopd diagnose: {len(diags)} runs", "", *_markdown_table(rows), "", ADV_NOTE, ""]
    lines += report.markdown_images(pngs) + report.markdown_warnings(warnings)
    md, js = out_dir / "report.md", out_dir / "comparison.json"
    write_text_atomic(md, "\n".join(lines))
    write_text_atomic(js, json.dumps({"runs": _payload(diags, names), "table": rows}, indent=2) + "\n")
    return [*pngs, md, js]


def run_compare(
    runs: Sequence[tuple[Path, DiagnoseConfig]],
    *,
    as_json: bool,
    plots_dir: Path | None,
    strict: bool,
    console: Console | None,
) -> int:
    """The `diagnose` stage for several paths: read all, then table or JSON and files; the exit code."""
    out_dir = Path(plots_dir or DEFAULT_DIR)
    for path, _ in runs:  # a typo in the last path fails before the first run is read
        require_path(Path(path))
    check_output_dir(out_dir, "plots folder")
    diags = [diagnose(Path(path), cfg, progress=console is not None) for path, cfg in runs]
    names = run_names([path for path, _ in runs])
    rows = [table_row(diag, name) for diag, name in zip(diags, names, strict=True)]
    written = write_comparison(diags, names, rows, out_dir)
    if as_json:
        payload = {"runs": _payload(diags, names), "report": [str(p) for p in written]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        print_comparison(rows, diags, console, written)
    return 1 if strict and any(d.verdict.verdict != "healthy" for d in diags) else 0
