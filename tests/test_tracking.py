"""metrics.jsonl (stableopd/engine/tracking.py): appends, non-finite values, and the trim a resume relies on.

pytest tests/test_tracking.py
"""

from __future__ import annotations

import json
import math

from stableopd.engine.tracking import MetricsLog, read_rows


def test_rows_are_appended_and_non_finite_values_stay_valid_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog.open(path, keep_until=None)
    log.write({"step": 1, "loss/total": math.nan, "optim/grad_norm": math.inf, "x": -math.inf, "y": 0.5})
    log.write({"step": 2, "loss/total": 0.25, "adv/repetitive_mean": None})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss/total": None, "optim/grad_norm": "inf", "x": "-inf", "y": 0.5},
        {"step": 2, "loss/total": 0.25, "adv/repetitive_mean": None},
    ]
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()  # strict JSON readers cope


def test_a_fresh_run_starts_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    assert MetricsLog.open(path, keep_until=None).rows == [] and path.read_text() == ""


def test_resume_keeps_rows_up_to_the_checkpoint_and_drops_a_cut_off_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss/total": s / 10} for s in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss/to')  # killed mid-write
    assert read_rows(path) == rows
    log = MetricsLog.open(path, keep_until=2)
    assert log.rows == rows[:3]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
    log.write({"step": 3, "loss/total": 0.3})
    assert read_rows(path) == rows[:4]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_read_rows_skips_lines_that_are_not_step_objects(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('[1, 2]\n{"no_step": 1}\n\n{"step": 3}\nnot json\n')
    assert read_rows(path) == [{"step": 3}]
    assert read_rows(tmp_path / "missing.jsonl") == []
