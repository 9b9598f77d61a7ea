"""Kill a tiny distill run at random moments, resume it, and compare it with a run that was never stopped.

One uninterrupted run first; then each trial starts the same run in a fresh directory, sends SIGKILL or
SIGTERM at a random moment after its first step, runs `--resume` until it finishes, and compares the final
metrics.jsonl (without time/*), the rollout files and the final weights and optimizer state with the
uninterrupted run. Prints one row per trial and the number identical.

    python benchmarks/kill_resume.py [--kills 10] [--terms 5] [--steps 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = [
    "-s",
    "train.prompts_per_step=2",
    "-s",
    "sampling.n=2",
    "-s",
    "sampling.max_new_tokens=12",
    "-s",
    "train.eval_every=2",
    "-s",
    "data.val_limit=2",
    "-s",
    "train.save_every=1",
    "-s",
    "train.keep_last=2",
    "-s",
    "train.lr=1e-3",
    "-s",
    "logging.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def command(data: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stableopd",
        "distill",
        "--student",
        "tiny",
        "--teacher",
        "tiny-teacher",
        "--data",
        str(data),
        "--out",
        str(run),
        "-s",
        f"train.steps={steps}",
        *ARGS,
        *extra,
    ]


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def fingerprint(run: Path, steps: int) -> tuple:
    metrics = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(run)]
    rollouts = {p.name: p.read_text() for p in sorted((run / "rollouts").glob("*.jsonl"))}
    ckpt = run / "checkpoints" / f"step_{steps:06d}"
    weights = load_file(ckpt / "model.safetensors")
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return metrics, rollouts, weights, optim


def same(a: tuple, b: tuple) -> tuple[bool, str]:
    if a[0] != b[0]:
        return False, "metrics differ"
    if a[1] != b[1]:
        return False, "rollout files differ"
    if a[2].keys() != b[2].keys() or not all(torch.equal(a[2][k], b[2][k]) for k in a[2]):
        return False, "weights differ"
    for sa, sb in zip(a[3]["state"].values(), b[3]["state"].values(), strict=True):
        if not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False, "optimizer state differs"
    return True, "identical"


def trial(
    data: Path, run: Path, steps: int, sig: int, rng: random.Random, step_s: float
) -> tuple[str, int, int]:
    """Start, signal at a random moment of a random step, resume until done; (last line, exit code, step)."""
    proc = subprocess.Popen(
        command(data, run, steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    target = rng.randint(1, steps - 1)
    while proc.poll() is None and not any(r.get("step", 0) >= target for r in rows(run)):
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, step_s))
    at = max((r.get("step", 0) for r in rows(run)), default=0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    code = proc.returncode
    for _ in range(3):
        if (run / "checkpoints" / f"step_{steps:06d}" / "COMPLETE").exists() and code == 0:
            break
        resumed = subprocess.run(
            command(data, run, steps, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
        )
        if resumed.returncode != 0:
            raise SystemExit(f"resume failed ({resumed.returncode}): {resumed.stderr[-800:]}")
        code = 0
    return err.strip().splitlines()[-1] if err.strip() else "", proc.returncode, at


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--terms", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="stableopd-kill-resume-"))
    data = root / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "prompt": f"{i}+{i + 1}=",
                    "answer": str(2 * i + 1),
                    "solution": str(2 * i + 1),
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command(data, root / "base", a.steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marks = {}
    while proc.poll() is None:
        logged = max((r.get("step", 0) for r in rows(root / "base")), default=-1)
        for s in (1, a.steps):
            if logged >= s and s not in marks:
                marks[s] = time.perf_counter()
        time.sleep(0.005)
    if proc.returncode != 0 or len(marks) < 2:
        raise SystemExit("the uninterrupted run failed")
    base_wall = time.perf_counter() - t0
    step_s = (marks[a.steps] - marks[1]) / (a.steps - 1)
    base = fingerprint(root / "base", a.steps)
    plan = [signal.SIGKILL] * a.kills + [signal.SIGTERM] * a.terms
    rng.shuffle(plan)
    ok = 0
    print(
        f"uninterrupted run: {a.steps} steps in {base_wall:.1f} s, {step_s:.2f} s a step (one thread); each "
        "signal lands at a random moment of a random step (validation and checkpoint writes included)"
    )
    print(f"{'#':>2} {'signal':8} {'at step':>7} {'exit':>5}  result")
    for i, sig in enumerate(plan, 1):
        run = root / f"t{i}"
        last, code, at = trial(data, run, a.steps, sig, rng, step_s)
        good, why = same(fingerprint(run, a.steps), base)
        ok += good
        print(
            f"{i:>2} {signal.Signals(sig).name:8} {at:>7} {code:>5}  {why}"
            + (f"  ({last[:90]})" if sig == signal.SIGTERM else "")
        )
    print(f"\n{ok} of {len(plan)} resumed runs identical to the uninterrupted one")
    return 0 if ok == len(plan) else 1


if __name__ == "__main__":
    sys.exit(main())
