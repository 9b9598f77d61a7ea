"""The detector on synthetic traces, the live guard, per-step metrics, and reading run dirs and JSONLs."""

from __future__ import annotations

import json
import random
import tracemalloc
import zlib
from pathlib import Path

import pytest

from stableopd.config import DiagnoseConfig
from stableopd.core.detector import CollapseGuard, detect
from stableopd.diagnostics.analysis import diagnose
from stableopd.diagnostics.series import LineProblems, iter_jsonl, response_metrics
from stableopd.errors import UserError

# ------------------------------------------------------------------ synthetic traces


def stable_trace(rng: random.Random, n: int = 300):
    """The paper's noisy stable regime: truncation 0.2-0.7 from step to step, repetition about 0."""
    trunc = [rng.uniform(0.2, 0.7) for _ in range(n)]
    length = [2000 + 4000 * t + rng.gauss(0, 300) for t in trunc]
    rep = [abs(rng.gauss(0, 0.01)) for _ in range(n)]
    return list(range(n)), trunc, rep, length


def collapse_trace(rng: random.Random, n: int = 300, at: int = 200, ramp: int = 5):
    steps, trunc, rep, length = stable_trace(rng, n)
    for i in range(at, n):
        f = min(1.0, (i - at + 1) / ramp)
        trunc[i] = (1 - f) * trunc[i] + f * rng.uniform(0.96, 1.0)
        rep[i] = (1 - f) * rep[i] + f * rng.uniform(0.3, 0.6)
        length[i] = 2000 + 4000 * trunc[i]
    return steps, trunc, rep, length


def inflation_trace(rng: random.Random, n: int = 300, at: int = 100):
    trunc, length = [], []
    for i in range(n):
        g = max(0, i - at) / (n - at)
        trunc.append(min(1.0, max(0.0, 0.1 + 0.6 * g + rng.uniform(-0.1, 0.1))))
        length.append(1500 * (1 + 2 * g) * rng.uniform(0.85, 1.15))
    return list(range(n)), trunc, [abs(rng.gauss(0, 0.01)) for _ in range(n)], length


def write_metrics(run: Path, trace, extra=None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (s, t, r, ln) in enumerate(zip(*trace, strict=True)):
        row = {"step": s, "rollout/trunc_rate": t, "rollout/rep_rate": r, "rollout/length_mean": ln}
        row |= (extra or {}).get(i, {})
        lines.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------ the detector


@pytest.mark.parametrize("seed", range(12))
def test_stable_noisy_run_is_healthy(seed):
    v = detect(*stable_trace(random.Random(seed)))
    assert v.verdict == "healthy" and v.onset_step is None


@pytest.mark.parametrize("seed", range(6))
def test_long_stable_run_with_independent_length_noise_is_healthy(seed):
    rng = random.Random(100 + seed)
    n = 1000
    trunc = [rng.uniform(0.2, 0.7) for _ in range(n)]
    length = [5000 * rng.uniform(0.6, 1.4) for _ in range(n)]
    rep = [rng.uniform(0.0, 0.08) for _ in range(n)]
    assert detect(list(range(n)), trunc, rep, length).verdict == "healthy"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ramp", [1, 5, 10])
def test_abrupt_collapse_onset_within_10_steps(seed, ramp):
    v = detect(*collapse_trace(random.Random(seed), at=200, ramp=ramp))
    assert v.verdict == "collapse"
    assert 200 <= v.onset_step <= 210


def test_paper_transition_within_30_steps_fires_once_truncation_passes_095():
    rng = random.Random(7)
    steps, trunc, rep, length = collapse_trace(rng, at=280, ramp=30, n=330)
    v = detect(steps, trunc, rep, length)
    first_hit = next(i for i in range(len(steps)) if trunc[i] >= 0.95 and rep[i] >= 0.2)
    assert v.verdict == "collapse" and first_hit <= v.onset_step <= first_hit + 3


def test_onset_is_the_first_step_of_the_excursion_not_when_patience_runs_out():
    n, at = 100, 50
    trunc = [0.5] * at + [1.0] * (n - at)
    rep = [0.0] * at + [0.5] * (n - at)
    steps = [10 * i for i in range(n)]  # step numbers need not be contiguous
    for patience in (1, 3, 8):
        v = detect(steps, trunc, rep, [100.0] * n, patience=patience)
        assert (v.verdict, v.onset_step) == ("collapse", 10 * at)
    # the excursion must last `patience` steps: 3 collapsed steps at the end are not enough for 4
    short = detect(steps[:53], trunc[:53], rep[:53], [100.0] * 53, patience=4)
    assert short.verdict == "healthy"


def test_single_step_dips_are_bridged_but_two_in_a_row_break_the_excursion():
    trunc = [0.5] * 20 + [1.0, 0.5, 1.0, 1.0] + [0.5] * 20
    rep = [0.0] * 20 + [0.5] * 4 + [0.0] * 20
    steps = list(range(len(trunc)))
    assert detect(steps, trunc, rep, [1.0] * len(trunc), patience=3, max_gap=1).onset_step == 20
    assert detect(steps, trunc, rep, [1.0] * len(trunc), patience=3, max_gap=0).verdict == "healthy"
    trunc2 = [0.5] * 20 + [1.0, 0.5, 0.5, 1.0, 1.0] + [0.5] * 20
    rep2 = [0.0] * 20 + [0.5] * 5 + [0.0] * 20
    assert detect(list(range(45)), trunc2, rep2, [1.0] * 45, patience=3, max_gap=1).verdict == "healthy"


def test_collapse_needs_both_truncation_and_a_jump_in_repetition():
    n = 120
    always_truncated = detect(list(range(n)), [1.0] * n, [0.05] * n, [500.0] * n)
    assert always_truncated.verdict == "healthy"  # a small budget that truncates everything is not collapse
    # repetition that was already high at the start does not count as a jump
    high_rep = detect(list(range(n)), [0.5] * 60 + [1.0] * 60, [0.4] * n, [500.0] * n)
    assert high_rep.verdict == "healthy"
    rep_only = detect(list(range(n)), [0.5] * n, [0.0] * 60 + [0.6] * 60, [500.0] * n)
    assert rep_only.verdict == "healthy"


@pytest.mark.parametrize("seed", range(6))
def test_slow_inflation_is_inflation_with_onset_near_the_trend_start(seed):
    v = detect(*inflation_trace(random.Random(seed), at=100))
    assert v.verdict == "inflation"
    assert 90 <= v.onset_step <= 140


def test_inflation_then_collapse_is_collapse_and_mentions_the_inflation():
    steps, trunc, rep, length = inflation_trace(random.Random(0), n=300, at=60)
    for i in range(250, 300):
        trunc[i], rep[i] = 1.0, 0.45
    v = detect(steps, trunc, rep, length)
    assert v.verdict == "collapse" and v.onset_step == 250
    assert any("inflating" in r for r in v.reasons)


def test_detect_thresholds_are_honoured_and_inputs_validated():
    steps, trunc, rep, length = collapse_trace(random.Random(1), at=200)
    assert detect(steps, trunc, rep, length).verdict == "collapse"
    # above the thresholds no collapse: the jump to full truncation still reads as inflation
    assert detect(steps, trunc, rep, length, collapse_rep_jump=0.7).verdict == "inflation"
    assert detect(steps, trunc, rep, length, collapse_trunc=1.0).verdict == "inflation"
    with pytest.raises(ValueError):
        detect([0, 1], [0.1], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        detect([1, 1], [0.1, 0.1], [0.0, 0.0], [1.0, 1.0])


def test_missing_values_never_fire_and_are_explained():
    n = 100
    v = detect(list(range(n)), [None] * n, [0.5] * n, [1.0] * n)
    assert v.verdict == "healthy" and any("no truncation" in r for r in v.reasons)
    trunc = [0.5] * 50 + [1.0] * 50
    rep = [0.0] * 50 + [None, 0.5] * 25  # every other value unknown: a gap of one, still an excursion
    assert detect(list(range(n)), trunc, rep, [1.0] * n).onset_step == 51


def test_live_guard_agrees_with_offline_detect_at_every_step():
    trace = collapse_trace(random.Random(3), n=240, at=200)
    guard = CollapseGuard(**DiagnoseConfig().thresholds())
    fired_at = None
    for i, step in enumerate(trace[0]):
        metrics = {
            "rollout/trunc_rate": trace[1][i],
            "rollout/rep_rate": trace[2][i],
            "rollout/length_mean": trace[3][i],
        }
        v = guard.update(step, metrics)
        assert v == detect(*(seq[: i + 1] for seq in trace))
        if v.verdict == "collapse" and fired_at is None:
            fired_at = step
            assert guard.changed
    assert 200 <= fired_at <= 210  # live, within a few steps of the transition
    # a resumed run replaying from step 150 drops the collapsed history
    v = guard.update(150, {"rollout/trunc_rate": 0.4, "rollout/rep_rate": 0.0, "rollout/length_mean": 3000.0})
    assert v.verdict == "healthy" and guard.steps[-1] == 150 and len(guard.steps) == 151 and guard.changed


# ------------------------------------------------------------------ per-step metrics from responses


def test_response_metrics_equal_a_hand_computation():
    recs = [
        {"response": "a b c", "response_token_ids": [1, 2, 3], "n_tokens": 3, "truncated": False,
         "sampler_logprobs": [-1.0, -2.0, -3.0], "teacher_logprobs": [-1.5, -1.0, -3.0], "correct": True},
        {"response": "x y x y x y", "response_token_ids": [7, 8, 7, 8, 7, 8], "n_tokens": 6,
         "finish_reason": "length", "sampler_logprobs": [-1.0] * 6, "teacher_logprobs": [-0.5] * 6,
         "correct": False},
    ]  # fmt: skip
    m, examples, warns, unit = response_metrics(
        [(f"f:{i}", r) for i, r in enumerate(recs)], prefix="rollout", text_field="response",
        finish_field="finish_reason", truncated_field="truncated", tail_chars=4, ratio=0.5, ngram=2,
    )  # fmt: skip
    assert unit == "tokens" and warns == [] and len(examples) == 2
    assert m["rollout/length_mean"] == 4.5 and m["rollout/length_max"] == 6
    assert m["rollout/trunc_rate"] == 0.5 and m["rollout/accuracy"] == 0.5
    # ngram 2 on [7,8,7,8,7,8]: windows at 2.. repeat, so tokens 2..5 are repetitive (4 of 9 tokens)
    assert m["rollout/rep_token_frac"] == pytest.approx(4 / 9)
    assert m["adv/repetitive_mean"] == pytest.approx(0.5)
    assert m["adv/regular_mean"] == pytest.approx((-0.5 + 1.0 + 0.0 + 0.5 + 0.5) / 5)
    assert m["teacher/logprob_mean"] == pytest.approx((-5.5 - 3.0) / 9)
    assert m["student/logprob_mean"] == pytest.approx(-12.0 / 9)
    for ex, rec in zip(examples, recs, strict=True):
        tail = rec["response"][-4:].encode()
        ratio = len(tail) / len(zlib.compress(tail))
        assert ex.ratio == pytest.approx(ratio) and ex.repetitive == (
            len(rec["response"]) > 4 and ratio > 0.5
        )


def test_length_falls_back_to_words_and_unknown_truncation_is_left_out():
    recs = [
        ("f:1", {"response": "one two three"}),
        ("f:2", {"response": "four five"}),
        ("f:3", {"text": "x"}),
    ]
    m, _, warns, unit = response_metrics(
        recs, prefix="val", text_field="response", finish_field="finish_reason",
        truncated_field="truncated", tail_chars=100, ratio=10.0, ngram=16,
    )  # fmt: skip
    assert unit == "words" and m["val/length_mean"] == 2.5 and "val/trunc_rate" not in m
    assert warns == ["f:3: no text field 'response', skipped"]
    bad = {
        "response": "a b",
        "response_token_ids": [1, 2],
        "sampler_logprobs": [-1.0],
        "teacher_logprobs": [-1.0],
    }
    m, _, warns, unit = response_metrics(
        [("f:9", bad)], prefix="rollout", text_field="response", finish_field="finish_reason",
        truncated_field="truncated", tail_chars=100, ratio=10.0, ngram=16,
    )  # fmt: skip
    assert warns == ["f:9: log-prob lists and token ids differ in length, not used"] and "adv/mean" not in m
    assert unit == "tokens" and m["rollout/length_mean"] == 2


# ------------------------------------------------------------------ reading


def read_records(path):
    problems = LineProblems()
    return list(iter_jsonl(path, problems)), problems.warnings(path.name)


def test_reading_jsonl_warns_with_line_numbers_and_never_crashes(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n[1, 2]\n{"a": 2}\n{"a": 3, "b": [1, 2')  # last line cut off
    records, warns = read_records(p)
    assert [no for no, _ in records] == [1, 5]
    assert warns == [
        "r.jsonl:2: blank line, skipped",
        "r.jsonl:3: not valid JSON, skipped",
        "r.jsonl:4: a JSON list, not an object, skipped",
        "r.jsonl:6: cut off (the file ends mid-record), skipped",
    ]
    p.write_bytes(b'{"a": "\xff"}\n\n\n')  # bad UTF-8 and trailing blank lines: no warning, no crash
    records, warns = read_records(p)
    assert len(records) == 1 and warns == []


def test_many_bad_lines_are_summarised(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join("oops\n" for _ in range(12)) + '{"step": 0, "rollout/trunc_rate": 0.1}\n')
    diag = diagnose(p, DiagnoseConfig())
    assert len(diag.warnings) == 6 and diag.warnings[-1] == "m.jsonl: 7 more lines not valid JSON, skipped"


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_input_is_a_user_error(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match="is empty"):
        diagnose(p, DiagnoseConfig())


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        diagnose(tmp_path / "nope.jsonl", DiagnoseConfig())
    with pytest.raises(UserError, match="not a run directory"):
        diagnose(tmp_path, DiagnoseConfig())
    (tmp_path / "metrics.jsonl").write_text("garbage\n")
    with pytest.raises(UserError, match="is empty"):
        diagnose(tmp_path, DiagnoseConfig())
    p = tmp_path / "foreign.jsonl"
    p.write_text('{"output": "hello", "stop": "eos"}\n')
    with pytest.raises(UserError, match="--text-field"):
        diagnose(p, DiagnoseConfig())


def test_metrics_file_and_run_directory_give_the_same_verdict(tmp_path):
    trace = collapse_trace(random.Random(5), n=260, at=180)
    write_metrics(tmp_path / "run", trace, extra={3: {"val/accuracy": 0.7, "note": "text is ignored"}})
    for path in (tmp_path / "run", tmp_path / "run" / "metrics.jsonl"):
        diag = diagnose(path, DiagnoseConfig())
        assert diag.kind == ("run" if path.is_dir() else "metrics")
        assert diag.verdict.verdict == "collapse" and 180 <= diag.verdict.onset_step <= 190
        assert (
            len(diag.steps) == 260 and diag.series["val/accuracy"] == {3: 0.7} and "note" not in diag.series
        )
        assert diag.final()["trunc_rate"] == trace[1][-1]


@pytest.mark.parametrize("trunc, rep, warned", [
    (0.625, 0.0, ["truncated", "diagnose.high_trunc=0.6"]),  # a smoke run truncating 62.5% from its first step
    (0.3, 0.7, ["repetitive", "diagnose.high_rep=0.5"]),
    (0.45, 0.1, []),  # the paper's noisy stable regime stays quiet
])  # fmt: skip
def test_a_high_level_that_never_changes_is_healthy_with_a_warning(tmp_path, trunc, rep, warned):
    rng = random.Random(0)
    n = 40
    trace = (list(range(n)), [trunc + rng.uniform(-0.02, 0.02) for _ in range(n)], [rep] * n,
             [100 + rng.uniform(-3, 3) for _ in range(n)])  # fmt: skip
    write_metrics(tmp_path / "run", trace)
    diag = diagnose(tmp_path / "run", DiagnoseConfig())
    assert diag.verdict.verdict == "healthy"
    level = [w for w in diag.warnings if "did not change enough" in w]
    if warned:
        assert len(level) == 1 and "median of the last 20 steps" in level[0], level
        assert all(part in level[0] for part in warned), level[0]
    else:
        assert level == []


def test_no_level_warning_when_the_verdict_already_says_collapse(tmp_path):
    write_metrics(tmp_path / "run", collapse_trace(random.Random(5), n=260, at=180))
    diag = diagnose(tmp_path / "run", DiagnoseConfig())
    assert diag.verdict.verdict == "collapse"
    assert not any("did not change enough" in w for w in diag.warnings)


def test_metrics_lines_without_step_are_warned(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "rollout/trunc_rate": 0.1}\n{"rollout/trunc_rate": 0.2}\n')
    diag = diagnose(p, DiagnoseConfig())
    assert diag.steps == [0] and diag.warnings == ["metrics.jsonl:2: no integer 'step' field, skipped"]


# ------------------------------------------------------------------ responses: ours and foreign

WORDS = "we then so add the sum is check value term next gives equal total half".split()


def response_text(rng: random.Random, looping: bool) -> str:
    text = " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(rng.randrange(150, 250)))
    if looping:
        text += " " + "Wait, let me recompute the sum once more. " * rng.randrange(30, 60)
    return text


def rollout_record(rng: random.Random, step: int, idx: int, looping: bool, truncated: bool) -> dict:
    text = response_text(rng, looping)
    ids = [sum(map(ord, w)) % 997 for w in text.split()]
    # the stored repetitive / compression_ratio are deliberately wrong: diagnose must recompute them
    return {
        "prompt_id": f"p{idx // 4}",
        "sample_idx": idx % 4,
        "prompt": "What is 2+2?",
        "prompt_token_ids": [1, 2],
        "response": text,
        "response_token_ids": ids,
        "sampler_logprobs": [-1.0] * len(ids),
        "teacher_logprobs": [-0.2 if looping else -1.2] * len(ids),
        "n_tokens": len(ids),
        "finish_reason": "length" if truncated else "stop",
        "truncated": truncated,
        "repetitive": False,
        "compression_ratio": 0.0,
        "step": step,
    }


def zlib_flag(text: str, tail: int, tau: float) -> bool:
    b = text[-tail:].encode("utf-8")
    return len(text) > tail and len(b) / len(zlib.compress(b)) > tau


def write_rollouts(
    run: Path, n_steps: int, collapse_at: int, per_step: int = 8, seed: int = 0
) -> list[list[dict]]:
    rng = random.Random(seed)
    (run / "rollouts").mkdir(parents=True, exist_ok=True)
    all_steps = []
    for step in range(n_steps):
        collapsed = step >= collapse_at
        recs = [
            rollout_record(
                rng, step, i, looping=collapsed and i % 2 == 0, truncated=collapsed or rng.random() < 0.4
            )
            for i in range(per_step)
        ]
        (run / "rollouts" / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        all_steps.append(recs)
    return all_steps


CFG = DiagnoseConfig(rep_tail_chars=1000, rep_ratio=10.0)


def test_run_directory_without_metrics_is_recomputed_from_rollouts(tmp_path):
    steps = write_rollouts(tmp_path, n_steps=40, collapse_at=25)
    diag = diagnose(tmp_path, CFG)
    assert diag.verdict.verdict == "collapse" and 25 <= diag.verdict.onset_step <= 27
    for step, recs in enumerate(steps):
        flags = [zlib_flag(r["response"], 1000, 10.0) for r in recs]
        assert diag.series["rollout/rep_rate"][step] == pytest.approx(sum(flags) / len(flags))
        assert diag.series["rollout/trunc_rate"][step] == pytest.approx(
            sum(r["truncated"] for r in recs) / len(recs)
        )
        assert diag.series["rollout/length_mean"][step] == pytest.approx(
            sum(r["n_tokens"] for r in recs) / len(recs)
        )
    assert diag.series["adv/repetitive_mean"][39] > diag.series["adv/regular_mean"][39]
    assert "metrics.jsonl missing: every series is recomputed from rollouts" in diag.warnings
    assert diag.examples and all(ex.truncated and ex.repetitive for ex in diag.examples)


def test_metrics_values_win_and_rollouts_fill_the_gaps(tmp_path):
    write_rollouts(tmp_path, n_steps=6, collapse_at=100)
    rows = [{"step": s, "rollout/trunc_rate": 0.123, "rollout/rep_rate": 0.0, "rollout/length_mean": 1.0,
             "rollout/length_max": 1.0, "rollout/rep_token_frac": 0.0} for s in range(3)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CFG.model_copy(update={"example_files": 1})
    diag = diagnose(tmp_path, cfg)
    assert [diag.series["rollout/trunc_rate"][s] for s in range(3)] == [0.123] * 3
    assert all(diag.series["rollout/length_mean"][s] > 100 for s in range(3, 6))  # recomputed
    assert {ex.step for ex in diag.examples} <= {3, 4, 5}  # steps 0-2 never read: metrics were complete


def test_validation_files_give_val_series(tmp_path):
    write_rollouts(tmp_path, n_steps=2, collapse_at=100)
    (tmp_path / "val").mkdir()
    rng = random.Random(9)
    recs = [
        rollout_record(rng, 0, i, looping=i == 0, truncated=i < 2) | {"correct": i % 2 == 0} for i in range(4)
    ]
    (tmp_path / "val" / "step_000001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    diag = diagnose(tmp_path, CFG)
    assert diag.series["val/accuracy"] == {1: 0.5} and diag.series["val/trunc_rate"] == {1: 0.5}
    assert diag.series["val/rep_rate"] == {1: 0.25}


@pytest.mark.parametrize("seed", range(3))
def test_responses_jsonl_flags_equal_independent_zlib(tmp_path, seed):
    rng = random.Random(seed)
    recs = [rollout_record(rng, 0, i, looping=rng.random() < 0.5, truncated=False) for i in range(30)]
    for r in recs:
        del r["step"]
    p = tmp_path / "gen.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for tail, tau in ((1000, 10.0), (300, 4.0)):
        diag = diagnose(p, DiagnoseConfig(rep_tail_chars=tail, rep_ratio=tau, examples=30))
        flags = [zlib_flag(r["response"], tail, tau) for r in recs]
        assert 0 < sum(flags) < len(flags)
        assert diag.kind == "responses" and diag.steps == [0]  # no step field: the file is one step
        assert diag.series["rollout/rep_rate"][0] == pytest.approx(sum(flags) / len(flags))
        by_line = {int(ex.source.rsplit(":", 1)[1]): ex.repetitive for ex in diag.examples}
        assert by_line == {i + 1: f for i, f in enumerate(flags)}


def test_foreign_jsonl_with_renamed_fields_and_chunks(tmp_path):
    rng = random.Random(11)
    rows = []
    for i in range(40):
        collapsed = i >= 20
        rows.append(
            {
                "output": response_text(rng, looping=collapsed),
                "stop_reason": "max_tokens" if collapsed else "end_turn",
            }
        )
    p = tmp_path / "other_tool.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CFG.model_copy(
        update={"text_field": "output", "finish_field": "stop_reason", "chunk_size": 4, "patience": 2}
    )
    diag = diagnose(p, cfg)
    assert diag.steps == list(range(10)) and diag.length_unit == "words"
    assert [diag.series["rollout/trunc_rate"][s] for s in range(10)] == [0.0] * 5 + [1.0] * 5
    assert diag.verdict.verdict == "collapse" and diag.verdict.onset_step == 5


def test_step_field_groups_records_and_records_without_it_are_warned(tmp_path):
    rng = random.Random(2)
    rows = [{"text": response_text(rng, False), "iter": s, "done": s == 0} for s in (0, 0, 1, 1)]
    rows.append({"text": "no step here"})
    p = tmp_path / "g.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DiagnoseConfig(text_field="text", step_field="iter", truncated_field="cut")
    diag = diagnose(p, cfg)
    assert diag.steps == [0, 1] and "rollout/trunc_rate" not in diag.series
    assert "g.jsonl:5: no integer 'iter' field, skipped" in diag.warnings
    assert any("rep_tail_chars=10000" in w for w in diag.warnings)  # short texts can never be repetitive
    assert any("no truncation" in r for r in diag.verdict.reasons)


def test_a_large_responses_file_is_streamed_in_bounded_memory(tmp_path):
    p = tmp_path / "big.jsonl"
    with p.open("w") as fh:
        for i in range(4_000):  # steps interleaved: every step stays open until the end of the file
            words = 50 + i % 7
            fh.write(
                json.dumps(
                    {
                        "step": i % 10,
                        "response": "w " * words,
                        "finish_reason": "length" if i % 4 == 0 else "stop",
                        "pad": "x" * 2200,
                    }
                )
                + "\n"
            )
    size = p.stat().st_size
    tracemalloc.start()
    diag = diagnose(p, DiagnoseConfig(rep_tail_chars=50, examples=3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert size > 8 << 20 and peak < size / 8, (
        size,
        peak,
    )  # holding the records would take several times size
    for step in range(10):
        expect = [50 + i % 7 for i in range(step, 4_000, 10)]
        assert diag.series["rollout/length_mean"][step] == pytest.approx(sum(expect) / len(expect))
        assert diag.series["rollout/trunc_rate"][step] == (0.5 if step % 2 == 0 else 0.0)
    assert len(diag.examples) == 3 and all(ex.truncated for ex in diag.examples)
