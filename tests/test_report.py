"""`run_diagnose` end to end: JSON, exit codes, PNG plots, report.md and the terminal report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from matplotlib.image import imread
from rich.console import Console

from stableopd.config import DiagnoseConfig
from stableopd.diagnostics import run_diagnose
from stableopd.report import highlight_tail, select_steps, sparkline

LOOP = "Wait, I should double-check this step again. "


def make_run(run: Path, *, collapse_at: int | None, n: int = 120, seed: int = 0) -> None:
    """metrics.jsonl in the paper's noisy stable regime (collapsing at `collapse_at`), plus two rollout files."""
    rng = random.Random(seed)
    (run / "rollouts").mkdir(parents=True)
    rows = []
    for s in range(n):
        down = collapse_at is not None and s >= collapse_at
        trunc = rng.uniform(0.97, 1.0) if down else rng.uniform(0.2, 0.7)
        rep = rng.uniform(0.3, 0.6) if down else rng.uniform(0.0, 0.02)
        row = {
            "step": s,
            "rollout/trunc_rate": trunc,
            "rollout/rep_rate": rep,
            "rollout/length_mean": 400 + 500 * trunc,
        }
        row |= {"rollout/rep_token_frac": rep * 0.8, "adv/repetitive_mean": -0.03, "adv/regular_mean": -0.16}
        if s % 10 == 0:
            row["val/accuracy"] = 0.6 if down else 0.72
        rows.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    for s in (n - 2, n - 1):
        recs = []
        for i in range(4):
            looping = collapse_at is not None and i < 2
            text = f"Step {i}: the sum is {i * 7}. " * 3 + (LOOP * 40 if looping else "Answer: 5.")
            recs.append({"response": text, "n_tokens": len(text.split()), "truncated": looping, "step": s})
        (run / "rollouts" / f"step_{s:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


CFG = DiagnoseConfig(rep_tail_chars=500, rep_ratio=5.0)


def test_json_output_has_the_contract_keys_and_writes_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, collapse_at=80)
    code = run_diagnose(run, CFG, as_json=True, plots_dir=None, strict=False, console=Console(file=None))
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"verdict", "onset_step", "steps", "final", "warnings"} <= set(out)
    assert out["verdict"] == "collapse" and 80 <= out["onset_step"] <= 82 and out["steps"] == 120
    assert (
        set(out["final"]) == {"trunc_rate", "rep_rate", "length_mean"} and out["final"]["trunc_rate"] >= 0.97
    )
    assert isinstance(out["warnings"], list)
    report = run / "report"  # the default plots dir of a run directory
    assert sorted(Path(p).name for p in out["report"]) == sorted(
        [
            "length.png",
            "truncation.png",
            "repetition.png",
            "advantage.png",
            "accuracy.png",
            "report.md",
            "diagnosis.json",
        ]
    )
    assert json.loads((report / "diagnosis.json").read_text())["onset_step"] == out["onset_step"]


def _red_pixels(png: Path) -> int:
    img = imread(png)  # (H, W, 4) floats in [0, 1]
    return int(((img[..., 0] > 0.8) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)).sum())


def test_plots_are_real_pngs_with_the_onset_marked(tmp_path, capsys):
    for name, at in (("bad", 80), ("good", None)):
        make_run(tmp_path / name, collapse_at=at)
        run_diagnose(
            tmp_path / name,
            CFG,
            as_json=True,
            plots_dir=tmp_path / f"plots_{name}",
            strict=False,
            console=None,
        )
    capsys.readouterr()
    for name in ("bad", "good"):
        for stem in ("length", "truncation", "repetition", "advantage", "accuracy"):
            png = tmp_path / f"plots_{name}" / f"{stem}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
            img = imread(png)
            assert (
                img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05
            )  # not a blank canvas
    # the dashed onset line (and its legend entry) is the only red on the plot
    assert _red_pixels(tmp_path / "plots_bad" / "truncation.png") > 100
    assert _red_pixels(tmp_path / "plots_good" / "truncation.png") == 0
    assert not (tmp_path / "good" / "report").exists()  # --plots DIR replaces the default


def test_report_md_states_verdict_onset_and_links_the_plots(tmp_path, capsys):
    make_run(tmp_path / "run", collapse_at=60)
    run_diagnose(tmp_path / "run", CFG, as_json=True, plots_dir=None, strict=False, console=None)
    onset = json.loads(capsys.readouterr().out)["onset_step"]
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert md.startswith("# stableopd diagnose: collapse") and f"- onset step: {onset}" in md
    for stem in ("length", "truncation", "repetition", "advantage", "accuracy"):
        assert f"![{stem}]({stem}.png)" in md


def test_strict_exit_code(tmp_path, capsys):
    make_run(tmp_path / "bad", collapse_at=80)
    make_run(tmp_path / "good", collapse_at=None)
    kw = {"as_json": True, "plots_dir": None, "console": None}  # a metrics.jsonl gets no default plots dir
    for name, strict, code, verdict in (
        ("bad", True, 1, "collapse"),
        ("bad", False, 0, "collapse"),
        ("good", True, 0, "healthy"),
    ):
        assert run_diagnose(tmp_path / name / "metrics.jsonl", CFG, strict=strict, **kw) == code
        assert json.loads(capsys.readouterr().out)["verdict"] == verdict


def test_terminal_report_shows_verdict_series_examples_and_warnings(tmp_path):
    run = tmp_path / "run"
    make_run(run, collapse_at=80)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 500, "rollout/trunc')  # a cut-off last line
    console = Console(record=True, width=150, color_system=None)
    assert run_diagnose(run, CFG, as_json=False, plots_dir=None, strict=False, console=console) == 0
    text = console.export_text()
    assert "COLLAPSE" in text and "onset at step 8" in text
    assert "rollout/trunc_rate" in text and "▁" in text  # sparklines
    assert "metrics.jsonl:121: cut off (the file ends mid-record), skipped" in text
    assert "rollouts/step_000119.jsonl:1" in text and "[truncated, repetitive]" in text
    assert "wrote " in text and "report.md" in text


def test_highlight_marks_exactly_the_loop():
    prose = "First we note that 12 + 30 = 42 and the bound holds for n = 3. "
    text = prose + LOOP * 10
    rendered = highlight_tail(text, max_chars=10_000)
    red = [span for span in rendered.spans if "red" in str(span.style)]
    assert len(red) == 1
    looped = rendered.plain[red[0].start : red[0].end]
    # a loop's phase is ambiguous: the prose's final ". " already fits the period, so it may join the span
    assert looped.lstrip(". ").startswith("Wait") and looped.endswith(LOOP) and "n = 3" not in looped
    tail = highlight_tail(text, max_chars=100)
    assert tail.plain.startswith("…") and len(tail.plain) == 101
    assert not [s for s in highlight_tail(prose, 1000).spans if "red" in str(s.style)]


def test_sparkline_and_step_selection():
    assert sparkline([]) == "" and sparkline([3.0] * 5) == "▁▁▁▁▁"
    assert sparkline([0.0, 1.0]) == "▁█"
    line = sparkline([float(i) for i in range(400)], width=40)
    assert len(line) == 40 and line[0] == "▁" and line[-1] == "█" and list(line) == sorted(line)
    steps = list(range(0, 1000, 5))
    picked = select_steps(steps, onset=505)
    assert {495, 500, 505, 510, 515} <= set(picked) and picked[0] == 0 and picked[-1] == 995
    assert select_steps([1, 2, 3], onset=None) == [1, 2, 3]


@pytest.mark.parametrize("plots", [False, True])
def test_responses_file_writes_plots_only_when_asked(tmp_path, capsys, plots):
    p = tmp_path / "gen.jsonl"
    p.write_text(json.dumps({"response": "x = 1", "finish_reason": "stop"}) + "\n")
    plots_dir = tmp_path / "out" if plots else None
    assert (
        run_diagnose(p, DiagnoseConfig(), as_json=True, plots_dir=plots_dir, strict=True, console=None) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 1 and out["verdict"] == "healthy"
    assert (tmp_path / "out" / "report.md").exists() == plots
