"""`run_diagnose` and `run_compare` end to end: JSON, exit codes, PNG plots, report.md, terminal output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from matplotlib.image import imread
from rich.console import Console

from stableopd.config import DiagnoseConfig
from stableopd.diagnostics.analysis import diagnose
from stableopd.diagnostics.compare import run_compare, run_names
from stableopd.diagnostics.report import (
    highlight_tail,
    overlay_figures,
    panel_figures,
    run_diagnose,
    select_steps,
    sparkline,
)

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


# ------------------------------------------------------------------ several runs: `diagnose RUN_A RUN_B`

OVERLAYS = ["truncation", "repetition", "length", "accuracy", "advantage"]


def edit_metrics(run: Path, extra) -> None:
    """Add `extra(step)` to every row of the run's metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r | extra(r["step"])) + "\n" for r in rows))


def two_runs(tmp_path: Path) -> list[tuple[Path, DiagnoseConfig]]:
    """`bad` collapses at step 80, its repetitive advantage climbing with the step; `good` is healthy."""
    make_run(tmp_path / "bad", collapse_at=80)
    make_run(tmp_path / "good", collapse_at=None, seed=1)
    edit_metrics(
        tmp_path / "bad", lambda s: {"adv/repetitive_mean": 0.01 * s, "adv/regular_mean": -0.001 * s}
    )
    return [(tmp_path / "bad", CFG), (tmp_path / "good", CFG)]


def test_compare_table_has_a_row_per_run_with_verdict_onset_accuracy_and_advantage_split(tmp_path):
    runs = two_runs(tmp_path)
    console = Console(record=True, width=200, color_system=None)
    assert run_compare(runs, as_json=False, plots_dir=tmp_path / "cmp", strict=False, console=console) == 0
    lines = console.export_text().splitlines()
    bad = next(line.split() for line in lines if line.startswith("bad "))
    good = next(line.split() for line in lines if line.startswith("good "))
    onset = diagnose(tmp_path / "bad", CFG).verdict.onset_step
    assert 80 <= onset <= 82
    # run verdict onset steps acc(first best last) trunc rep len adv(rep reg)
    assert bad[:7] == ["bad", "collapse", str(onset), "120", "0.720", "0.720", "0.600"]
    assert good[:7] == ["good", "healthy", "-", "120", "0.720", "0.720", "0.720"]
    later = range(onset, 120)  # the split is averaged from the onset on, over the whole run without one
    assert float(bad[10]) == pytest.approx(sum(0.01 * s for s in later) / len(later), abs=1e-3)
    assert float(bad[11]) == pytest.approx(sum(-0.001 * s for s in later) / len(later), abs=1e-3)
    assert good[10:] == ["-0.030", "-0.160"]
    assert float(bad[7]) >= 0.97 and float(good[7]) <= 0.7  # last-step truncation
    text = "\n".join(lines)
    assert "bad: " not in text and "good: no response is longer than rep_tail_chars=500" in text
    assert "Worst examples" not in text and "Series at a glance" not in text  # not the single-run report


def test_compare_json_names_each_run_and_lists_overlay_pngs(tmp_path, capsys):
    runs = two_runs(tmp_path)
    out = tmp_path / "cmp"
    assert run_compare(runs, as_json=True, plots_dir=out, strict=False, console=None) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["verdict"]) for r in payload["runs"]] == [("bad", "collapse"), ("good", "healthy")]
    for run, (path, cfg) in zip(payload["runs"], runs):
        assert run == diagnose(path, cfg).to_json() | {"name": run["name"]}
    names = [f"{stem}.png" for stem in OVERLAYS] + ["report.md", "comparison.json"]
    assert sorted(Path(p).name for p in payload["report"]) == sorted(names)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left
    for stem in OVERLAYS:
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png)[..., :3].std() > 0.05
    md = (out / "report.md").read_text()
    assert "| run | verdict | onset | steps |" in md and "| bad | collapse |" in md
    assert all(f"![{stem}]({stem}.png)" in md for stem in OVERLAYS)
    table = json.loads((out / "comparison.json").read_text())["table"]
    assert [(r["name"], r["onset_step"]) for r in table] == [
        ("bad", payload["runs"][0]["onset_step"]),
        ("good", None),
    ]


def test_overlay_figures_draw_one_colour_per_run_with_its_onset(tmp_path):
    diags = [diagnose(path, cfg) for path, cfg in two_runs(tmp_path)]
    figures = overlay_figures(diags, ["bad", "good"])
    assert list(figures) == OVERLAYS  # no validation truncation in these runs
    onset = diags[0].verdict.onset_step
    for stem, fig in figures.items():
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["bad", "good"]
        vertical = [line for line in ax.get_lines() if list(line.get_xdata()) == [onset, onset]]
        curves = [line for line in ax.get_lines() if line not in vertical]
        per_run = 2 if stem == "advantage" else 1
        assert len(vertical) == 1 and len(curves) == 2 * per_run
        assert (
            vertical[0].get_linestyle() == "--" and vertical[0].get_color() == curves[0].get_color() == "C0"
        )
        assert {c.get_color() for c in curves[per_run:]} == {"C1"}  # the same colour per run in every panel
    styles = [line.get_linestyle() for line in figures["advantage"].axes[0].get_lines()[:2]]
    assert styles == ["-", "--"]  # repetitive solid, regular dashed


@pytest.mark.parametrize(("second", "code"), [(None, 1), (0, 0)])
def test_compare_strict_fails_when_any_run_is_not_healthy(tmp_path, capsys, second, code):
    make_run(tmp_path / "first", collapse_at=80 if second is None else None)
    make_run(tmp_path / "second", collapse_at=None, seed=2)
    runs = [(tmp_path / "first", CFG), (tmp_path / "second", CFG)]
    assert run_compare(runs, as_json=True, plots_dir=tmp_path / "cmp", strict=True, console=None) == code
    verdicts = [r["verdict"] for r in json.loads(capsys.readouterr().out)["runs"]]
    assert verdicts == (["collapse", "healthy"] if code else ["healthy", "healthy"])


def test_run_names_are_folder_names_told_apart_when_equal(tmp_path):
    for sub in ("a/run", "b/run", "c"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "c" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "gen.jsonl").write_text("{}\n")
    paths = [tmp_path / "a/run", tmp_path / "b/run", tmp_path / "c/metrics.jsonl", tmp_path / "gen.jsonl"]
    assert run_names(paths) == ["a/run", "b/run", "c", "gen"]
    assert run_names([tmp_path / "c", tmp_path / "c/metrics.jsonl"]) == ["c", "c (2)"]  # the same run twice


def test_single_run_draws_the_advantage_split_over_adv_mean_and_training_panels(tmp_path, capsys):
    make_run(tmp_path / "run", collapse_at=None)
    training = {"adv/mean": -0.15, "loss/total": 1.0, "loss/opd": 0.9, "optim/grad_norm": 2.0}
    edit_metrics(tmp_path / "run", lambda s: training | ({"val/reverse_kl": 0.3} if s % 10 == 0 else {}))
    figures = panel_figures(diagnose(tmp_path / "run", CFG))
    assert {"loss", "grad_norm", "reverse_kl"} <= set(figures) and "logprobs" not in figures
    lines = {line.get_label(): line for line in figures["advantage"].axes[0].get_lines()}
    mean, regular = lines["adv/mean"], lines["adv/regular_mean"]
    assert mean.get_zorder() < regular.get_zorder() and mean.get_linestyle() == ":"
    assert mean.get_color() not in {regular.get_color(), lines["adv/repetitive_mean"].get_color()}
    assert [line.get_label() for line in figures["loss"].axes[0].get_lines()] == ["loss/total", "loss/opd"]
    code = run_diagnose(tmp_path / "run", CFG, as_json=True, plots_dir=None, strict=False, console=None)
    assert code == 0 and (tmp_path / "run" / "report" / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------
# The end-of-run summary (progress.run_summary)


def summary_rows() -> list[dict]:
    return [
        {"step": 0, "val/accuracy": 0.25},
        {"step": 1, "rollout/trunc_rate": 0.5, "rollout/rep_rate": 0.0, "rollout/length_mean": 40.0},
        {"step": 2, "val/accuracy": 0.75, "rollout/trunc_rate": 0.25, "rollout/rep_rate": 0.0,
         "rollout/length_mean": 30.0, "guard/verdict": "healthy"},
        {"step": 3, "rollout/trunc_rate": 0.0, "rollout/rep_rate": 0.125, "rollout/length_mean": 20.0,
         "guard/verdict": "healthy"},
        {"step": 4, "val/accuracy": 0.5, "rollout/trunc_rate": 0.0, "rollout/rep_rate": 0.0,
         "rollout/length_mean": 22.5, "guard/verdict": "healthy"},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kept, where",
    [
        (["step_000002", "step_000004"], " (checkpoints/step_000002)"),
        (["step_000004"], " (no checkpoint kept at that step)"),
    ],
)
def test_run_summary_names_start_end_best_and_its_checkpoint(kept, where):
    from stableopd.progress import run_summary

    lines = run_summary(summary_rows(), first_step=1, wall_s=90.0, checkpoints=kept)
    assert lines == [
        "finished step 4: 4 steps in 1 min 30 s (22.50 s a step)",
        f"val_acc 0.25 at step 0 -> 0.5 at step 4; best 0.75 at step 2{where}",
        "last step's rollouts: length 22.5, truncated 0.00, repetitive 0.00; guard: healthy",
    ]


def test_run_summary_after_a_resume_counts_only_the_steps_it_ran():
    from stableopd.progress import run_summary

    lines = run_summary(summary_rows(), first_step=3, wall_s=3.0, checkpoints=[])
    assert lines[0] == "finished step 4: 2 steps in 3.0 s (1.50 s a step)"


def test_step_profile_of_a_run_without_step_times():
    """Runs written before time/step_s: the step is the sum of the parts it has; step 0 (validation before
    training) is not a training step; a part missing on a step counts 0 there."""
    from stableopd.diagnostics.profile import step_profile

    series = {"time/rollout_s": {1: 1.0, 2: 3.0}, "time/teacher_s": {1: 1.0, 2: 1.0},
              "time/train_s": {1: 2.0, 2: 2.0}, "time/val_s": {0: 5.0, 2: 2.0}}  # fmt: skip
    rows = {r.part: r for r in step_profile(series)}
    assert list(rows) == ["rollout", "teacher", "train", "val", "step"]
    assert (rows["rollout"].median_s, rows["rollout"].share) == (2.0, pytest.approx(4 / 12))
    assert (rows["val"].median_s, rows["val"].mean_s, rows["val"].share) == (1.0, 1.0, pytest.approx(2 / 12))
    assert (rows["step"].median_s, rows["step"].share) == (6.0, 1.0)
    series["time/step_s"] = {1: 5.0, 2: 10.0}  # the measured interval wins over the sum of the parts
    rows = {r.part: r for r in step_profile(series)}
    assert rows["step"].median_s == 7.5 and rows["rollout"].share == pytest.approx(4 / 15)
    assert step_profile({"loss/total": {1: 0.5}}) == []
