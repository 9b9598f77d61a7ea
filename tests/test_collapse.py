"""The paper's collapse in miniature (examples/collapse.yaml), shortened: vanilla OPD inflates to the
length budget and loops, StableOPD in the same world does not.

Installs collapse-teacher and collapse-student from their shipped weights into the session cache, then
runs the example for STEPS of its 150 steps twice, OPD and StableOPD side by side in two one-thread
processes. Measured on the full run with two seeds: OPD's rollout truncation passes 0.5 by step 18-24 and
stays around 0.8 from step 40 on (peaks 0.91-0.92), nearly every truncated rollout looping on the check
line; StableOPD's stays at or below 0.2. The assertions are on the direction and a wide margin, not on the
exact curves, which another CPU's float rounding moves.

    pytest tests/test_collapse.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stableopd.models.loading import resolve_model_path

COLLAPSE = Path(__file__).resolve().parents[1] / "examples" / "collapse.yaml"
STEPS = 50
LAST = 10  # steps averaged at the end of each run

pytestmark = pytest.mark.slow


def launch(out: Path, *sets: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "stableopd", "distill", "-c", str(COLLAPSE), "--out", str(out),
            "-s", f"train.steps={STEPS}", "-s", f"train.eval_every={STEPS}", "-s", "train.save_every=1000",
            "-s", "data.val_limit=100",
            *(x for s in sets for x in ("-s", s))]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two runs on two cores: one thread each
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tail_mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None][-LAST:]
    return sum(values) / len(values)


def test_opd_collapses_where_stableopd_holds(tmp_path):
    for name in ("collapse-teacher", "collapse-student"):  # build once, before two processes want them
        resolve_model_path(name)
    runs = {"opd": tmp_path / "opd", "stableopd": tmp_path / "stableopd"}
    procs = {k: launch(out, f"loss.objective={k}") for k, out in runs.items()}
    for proc in procs.values():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output
    rows = {k: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            for k, out in runs.items()}  # fmt: skip
    opd, stable = rows["opd"], rows["stableopd"]
    assert [r["step"] for r in opd][-1] == STEPS and [r["step"] for r in stable][-1] == STEPS
    trunc = {k: tail_mean(v, "rollout/trunc_rate") for k, v in rows.items()}
    rep = {k: tail_mean(v, "rollout/rep_rate") for k, v in rows.items()}
    assert trunc["opd"] >= 0.5 and trunc["opd"] >= trunc["stableopd"] + 0.3, trunc
    assert rep["opd"] >= 0.2 and rep["opd"] >= rep["stableopd"] + 0.15, rep
    # the paper's Figure 4: the teacher predicts the loop, so repeated tokens are penalised less
    assert tail_mean(opd, "adv/repetitive_mean") > tail_mean(opd, "adv/regular_mean")
    # greedy validation: OPD's answers run out of budget, StableOPD's still end
    assert opd[-1]["val/trunc_rate"] >= 0.5 and stable[-1]["val/trunc_rate"] <= 0.2
    assert opd[-1]["val/accuracy"] <= 0.05 and stable[-1]["val/accuracy"] >= opd[-1]["val/accuracy"] + 0.05
