"""Seconds per distill step and accuracy, stableopd against TRL's on-policy `DistillationTrainer`, same work.

Purpose: the peer a user would pick instead, on the quickstart setting (examples/quickstart.yaml): the
cached arith-teacher and arith-student, the same 16 prompts per step in the same order, 4 samples each
(TRL gets each prompt 4 times in a row in a 64-row generation batch), 96 new tokens, temperature 1.0,
top_p 0.95, lr 1.5e-4 constant, AdamW without weight decay, gradient clipping at 1.0, fp32, one process.
Contenders (`--runs`):
    stableopd-jsd       loss.objective=jsd with ref_kl_coef=0: the generalized JSD (beta 0.5), TRL's loss
    stableopd-jsd-kl    loss.objective=jsd as the quickstart sets it (plus the 0.01 KL to the initial student)
    stableopd           the default objective (OPD + KL to the initial student + golden SFT)
    trl                 TRL DistillationTrainer, beta 0.5, gradient checkpointing off as in stableopd
    trl-ckpt            the same with TRL's default gradient checkpointing
Method: each contender runs in its own process, one after another; a round runs every contender, and
rounds alternate the order (odd rounds reversed), seed = round index unless --seeds says otherwise. Each
process is timed per step (stableopd: metrics.jsonl's time/* without validation and checkpoint time,
which TRL does not do here; TRL: a callback around each optimizer step, with its generation and teacher
forwards timed inside). The median of steps 3..N is the step time. With --accuracy, every contender's
final weights are scored by `stableopd eval` on the quickstart's 200 held-out problems, greedy.
Deviations: TRL samples from its own RNG stream, so the rollouts differ in content, not in count or budget.
Needs the `bench` extra (pip install -e ".[bench]"); without TRL the TRL contenders are skipped with a line.

Sampling alone, against a raw `model.generate` call: benchmarks/bench_sampling.py.

Command: OMP_NUM_THREADS=1 python benchmarks/compare_trl.py [--steps 30] [--rounds 2] [--accuracy]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
RUNS = ("stableopd-jsd", "stableopd-jsd-kl", "stableopd", "trl", "trl-ckpt")
SETTINGS = {
    "stableopd-jsd": ["loss.objective=jsd", "loss.ref_kl_coef=0"],
    "stableopd-jsd-kl": ["loss.objective=jsd"],
    "stableopd": [],
}
PARTS = ("rollout", "teacher", "train", "other")


# ---------------------------------------------------------------- one contender, in its own process


def stableopd_child(run: str, steps: int, seed: int, out: Path) -> dict:
    """The user's command, timed by its own metrics; returns per-step seconds and the final model's path."""
    run_dir = out / "run"
    cmd = [
        sys.executable,
        "-m",
        "stableopd",
        "distill",
        "-c",
        str(QUICKSTART),
        "--out",
        str(run_dir),
        "-s",
        f"train.steps={steps}",
        "-s",
        "train.eval_every=0",
        "-s",
        f"train.save_every={steps}",
        "-s",
        f"train.seed={seed}",
        "-s",
        f"sampling.seed={seed}",
        "-s",
        f"data.seed={seed}",
        "-s",
        "logging.progress=false",
        *(a for s in SETTINGS[run] for a in ("-s", s)),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = []
    for r in rows:
        if r["step"] >= 1:
            whole = r["time/step_s"] - r.get("time/val_s", 0.0) - r.get("time/save_s", 0.0)
            times.append({"step": whole, **{p: r[f"time/{p}_s"] for p in PARTS[:3]}})
    for t in times:
        t["other"] = t["step"] - sum(t[p] for p in PARTS[:3])
    return {"times": times, "model": str(run_dir / "checkpoints" / f"step_{steps:06d}")}


def step_prompts(steps: int, seed: int) -> tuple[list[list[int]], object]:
    """The stableopd step order of the quickstart's training prompts (ids after the template), n times each."""
    from stableopd.config import load_config
    from stableopd.data.sources import encode_prompts, examples_for
    from stableopd.models.loading import load_tokenizer
    from stableopd.stages.distill import step_indices

    cfg = load_config(QUICKSTART, [f"data.seed={seed}"])
    d = cfg.data
    train = examples_for(d, source=d.source, split=d.split, limit=d.limit)
    tok = load_tokenizer(cfg.student.name)
    ids = encode_prompts(
        tok,
        train,
        chat_template=d.chat_template,
        system_prompt=d.system_prompt,
        max_tokens=d.max_prompt_tokens,
    )
    order = [
        i
        for s in range(1, steps + 1)
        for i in step_indices(len(train), s, cfg.train.prompts_per_step, d.seed)
    ]
    return [ids[i] for i in order for _ in range(cfg.sampling.n)], cfg


def trl_child(run: str, steps: int, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from stableopd.models.loading import resolve_model_path

    rows, cfg = step_prompts(steps, seed)
    s_path, t_path = resolve_model_path(cfg.student.name), resolve_model_path(cfg.teacher.name)
    tok = AutoTokenizer.from_pretrained(s_path, padding_side="left")
    texts = [tok.decode(r) for r in rows]
    by_text = dict(zip(texts, rows))
    batch = cfg.train.prompts_per_step * cfg.sampling.n
    args = DistillationConfig(
        output_dir=str(out / "trl"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.train.grad_clip,
        beta=cfg.loss.jsd_beta,
        temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p,
        top_k=0,
        max_completion_length=cfg.sampling.max_new_tokens,
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=run == "trl-ckpt",
        use_cpu=True,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    student = AutoModelForCausalLM.from_pretrained(s_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(t_path, dtype=torch.float32)
    clock: dict[str, float] = {"rollout": 0.0, "teacher": 0.0}
    times: list[dict] = []

    class Timed(DistillationTrainer):
        def _tokenize_prompts(self, prompts):  # the exact stableopd prompt ids, not a re-tokenization
            return [list(by_text[p]) for p in prompts], None, {}

        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                clock["rollout"] += time.perf_counter() - t0

        def _get_last_hidden_state(self, model, *a, **k):
            t0 = time.perf_counter()
            try:
                return super()._get_last_hidden_state(model, *a, **k)
            finally:
                if model is self.accelerator.unwrap_model(self.teacher_model):
                    clock["teacher"] += time.perf_counter() - t0

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.update(rollout=0.0, teacher=0.0, t0=time.perf_counter())

        def on_step_end(self, *_, **__):
            whole = time.perf_counter() - clock["t0"]
            times.append(
                {
                    "step": whole,
                    "rollout": clock["rollout"],
                    "teacher": clock["teacher"],
                    "train": whole - clock["rollout"] - clock["teacher"],
                    "other": 0.0,
                }
            )

    trainer = Timed(
        model=student,
        teacher_model=teacher,
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        callbacks=[StepTimes()],
    )
    trainer.train()
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    tok.save_pretrained(str(model_dir))
    for name in ("generation_config.json",):  # the student's stop ids, as stableopd reads them
        src = Path(s_path) / name
        if src.is_file():
            (model_dir / name).write_text(src.read_text())
    return {"times": times, "model": str(model_dir)}


def child(run: str, steps: int, seed: int, out: Path, result: Path) -> None:
    fn = trl_child if run.startswith("trl") else stableopd_child
    result.write_text(json.dumps(fn(run, steps, seed, out)))


# ---------------------------------------------------------------- the parent: rounds, accuracy, table


def accuracy(models: list[str]) -> list[float]:
    cmd = [
        sys.executable,
        "-m",
        "stableopd",
        "eval",
        *models,
        "-c",
        str(QUICKSTART),
        "-s",
        "data.split=validation",
        "-s",
        "data.limit=200",
        "--json",
    ]
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    rows = summary if isinstance(summary, list) else summary.get("models", [summary])
    return [float(r["accuracy"]) for r in rows]


def median_split(times: list[dict]) -> dict[str, float]:
    kept = times[2:] or times  # steps 3..N
    return {k: statistics.median(t[k] for t in kept) for k in ("step", *PARTS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["stableopd-jsd", "stableopd", "trl"], choices=RUNS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", help="one per round (default: the round index)")
    ap.add_argument("--accuracy", action="store_true", help="score each contender's final weights")
    ap.add_argument("--child", nargs=4, metavar=("RUN", "STEPS", "SEED", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run, steps, seed, out = args.child
        child(run, int(steps), int(seed), Path(out), Path(out) / "result.json")
        return
    runs = list(args.runs)
    if importlib.util.find_spec("trl") is None and any(r.startswith("trl") for r in runs):
        print('TRL is not installed (pip install -e ".[bench]"): the TRL contenders are skipped')
        runs = [r for r in runs if not r.startswith("trl")]
    seeds = args.seeds or list(range(args.rounds))
    results: dict[str, list[dict]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory(prefix="compare_trl_") as tmp:
        for rnd, seed in enumerate(seeds):
            order = runs if rnd % 2 == 0 else runs[::-1]
            for run in order:
                out = Path(tmp) / f"{run}-{rnd}"
                out.mkdir()
                t0 = time.perf_counter()
                log = out / "log.txt"
                with log.open("w") as fh:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", run, str(args.steps), str(seed), str(out)],
                        cwd=ROOT,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                    )
                if done.returncode:
                    sys.exit(f"{run} (round {rnd + 1}) failed:\n{log.read_text()[-3000:]}")
                res = json.loads((out / "result.json").read_text())
                res.update(
                    seed=seed, round=rnd, wall=time.perf_counter() - t0, split=median_split(res["times"])
                )
                if args.accuracy:
                    res["accuracy"] = accuracy([res["model"]])[0]
                results[run].append(res)
                acc = f", accuracy {res['accuracy']:.3f}" if "accuracy" in res else ""
                print(f"round {rnd + 1} {run}: median step {res['split']['step']:.3f} s{acc}", flush=True)
    print_table(results, args, seeds)


def print_table(results: dict[str, list[dict]], args, seeds: list[int]) -> None:
    import torch

    base = next((r for r in ("trl", "trl-ckpt") if results.get(r)), None)
    print(
        f"\n{args.steps} steps per run, median of steps 3..{args.steps}; {torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); seeds {seeds}\n"
    )
    head = (
        "| run | "
        + " | ".join(f"round {i + 1} s" for i in range(len(seeds)))
        + " | median s | rollout | teacher | train | other |"
        + (f" vs {base} |" if base else "")
        + (" accuracy |" if args.accuracy else "")
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    ref = statistics.median(r["split"]["step"] for r in results[base]) if base else None
    for run, rs in results.items():
        med = statistics.median(r["split"]["step"] for r in rs)
        parts = [statistics.median(r["split"][p] for r in rs) for p in PARTS]
        cells = [f"{r['split']['step']:.3f}" for r in rs] + [f"{med:.3f}"] + [f"{p:.3f}" for p in parts]
        if base:
            cells.append(f"{med / ref:.2f}x")
        if args.accuracy:
            cells.append(" / ".join(f"{r['accuracy']:.3f}" for r in rs))
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
