"""Multi-process distill (stableopd/distributed.py): 2 processes with gloo on CPU against 1 process.

What is checked, and against what:
- 2 processes (torchrun) and 1 process on the same global batch, greedy sampling, 2 steps: the same rollouts,
  every step metric within 1e-5 relative (losses included; measured ~2e-7), final weights within 1e-3 * lr
  absolute (measured 3.3e-7 at lr 1e-3), Adam moments within 1e-5 of each tensor's largest entry. Golden solutions are missing
  for some prompts, so ranks hold different numbers of them and the zero-weight padding micro-batches run;
- a 2-process run launched with `--nproc 2` resumes from its step-1 checkpoint, and a 2-process checkpoint
  resumes in 1 process; both end where the uninterrupted 1-process run ends (same tolerances);
- `--nproc 2` with an odd global batch exits 2 with one line; a rank that raises makes the whole launch
  exit quickly (torchrun tears the group down; train.dist_timeout_s bounds any wait on a collective).

    pytest tests/test_distributed.py -s
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stableopd.tracking import read_rows

COMMON = {
    "train.steps": 2, "train.prompts_per_step": 4, "sampling.n": 1, "sampling.temperature": 0,
    "sampling.max_new_tokens": 10, "train.micro_batch": 1, "train.eval_every": 2, "data.val_limit": 2,
    "train.save_every": 1, "logging.progress": "false", "train.dist_timeout_s": 60, "train.lr": 1e-3,
}  # fmt: skip
REL = 1e-5  # step metrics, relative
# Weights: absolute, as a fraction of one Adam step (lr): Adam divides by sqrt(v), so a gradient entry near 0
# turns float-rounding differences of the summed gradient into update differences of up to ~lr.
WABS = 1e-3 * COMMON["train.lr"]
MREL = 1e-5  # Adam moments, relative to each tensor's largest entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(data: Path, run: Path, **over) -> list[str]:
    merged = {**COMMON, **{k.replace("__", "."): v for k, v in over.items()}}
    sets = [a for k, v in merged.items() for a in ("-s", f"{k}={v}")]
    return ["distill", "--student", "tiny", "--teacher", "tiny-teacher", "--data", str(data), "--out", str(run), *sets]


def launch(cli: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, "-m", "stableopd", *cli] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "stableopd", *cli]  # fmt: skip
    import os

    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddata") / "train.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1),
             **({"solution": f"{i}+{i + 1}={2 * i + 1}"} if i % 3 else {})} for i in range(12)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    proc = launch(args(data, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = read_rows(a / "metrics.jsonl"), read_rows(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        for k, v in ra.items():
            if k.startswith("time/") or not isinstance(v, float):
                assert k.startswith("time/") or v == rb[k], (ra["step"], k, v, rb[k])
                continue
            assert rb[k] == pytest.approx(v, rel=REL, abs=1e-7), (ra["step"], k, v, rb[k])
    for step in (1, 2):
        name = f"rollouts/step_{step:06d}.jsonl"
        ids = [[json.loads(line)["response_token_ids"] for line in (run / name).read_text().splitlines()]
               for run in (a, b)]
        assert ids[0] == ids[1]
    ck_a, ck_b = a / "checkpoints/step_000002", b / "checkpoints/step_000002"
    wa, wb = load_file(ck_a / "model.safetensors"), load_file(ck_b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) <= WABS, k
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ck_a, ck_b))
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    for i, st in oa["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            diff = float((st[key] - ob["state"][i][key]).abs().max())
            assert diff <= MREL * float(st[key].abs().max()) + 1e-12, (i, key)


def test_two_processes_match_one(data, single, tmp_path):
    run = tmp_path / "dp"
    t0 = time.perf_counter()
    proc = launch(args(data, run), nproc=2)
    print(f"2-process run: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per rank (2 processes)" in proc.stderr + proc.stdout
    rows = read_rows(run / "metrics.jsonl")
    assert any(r.get("data/gold_missing") for r in rows)  # ranks held different numbers of golden solutions
    assert_same_run(single, run)
    assert len((run / "val/step_000002.jsonl").read_text().splitlines()) == 2


def test_resume_two_processes_and_with_another_count(data, single, tmp_path):
    run = tmp_path / "dp"
    first = launch([*args(data, run, train__steps=1), "--nproc", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    other = tmp_path / "dp_to_1"
    import shutil

    shutil.copytree(run, other)
    resumed = launch([*args(data, run), "--resume", "--nproc", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(single, run)
    in_one = launch([*args(data, other), "--resume"])  # a 2-process checkpoint resumed by 1 process
    assert in_one.returncode == 0, in_one.stderr[-3000:]
    assert_same_run(single, other)


def test_batch_not_divisible_exits_2_with_one_line(data, tmp_path):
    proc = launch([*args(data, tmp_path / "r", train__prompts_per_step=3), "--nproc", "2"])
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "prompts_per_step=3" in lines[0] and "divisible" in lines[0], lines


def test_failing_rank_stops_the_others(data, tmp_path):
    t0 = time.perf_counter()
    proc = launch(args(data, tmp_path / "r"), nproc=2, env={"STABLEOPD_TEST_FAIL": "1:1"}, timeout=120)
    wall = time.perf_counter() - t0
    print(f"failing-rank launch ended in {wall:.1f}s")
    assert proc.returncode != 0
    assert "STABLEOPD_TEST_FAIL: rank 1 fails at step 1" in proc.stderr
    assert wall < 60  # COMMON sets train.dist_timeout_s=60: nobody waited for it
