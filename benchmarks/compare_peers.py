"""stableopd's losses and whole distill updates against the peers' and naive full-logits ones: time and memory.

Purpose: one command that regenerates the README's peer table. Two parts, both forward + backward, fp32, CPU:
1. Losses at N tokens (`--n`, default 4096) with SmolLM2-135M's head (d=576, V=49152), all tokens valid:
   JSD (beta 0.5): naive full logits; stableopd `linear_jsd` (per-token) and `linear_jsd_sum`; Liger-Kernel's
   chunked `LigerFusedLinearJSDLoss` (torch.compile'd chunks); TRL GKD's `generalized_jsd_loss` on full logits.
   KL(student || reference): naive; `linear_kl`; `linear_kl_sum`.
   Each call runs in a fresh process (benchmarks/bench_kernels.py's method and peak-memory measure).
2. One distill update (`stableopd.engine.update.accumulate`) per objective against a naive update that computes the
   same loss from full (B, L, V) logits: a 2-layer Llama with the same head, `--rollouts` responses of
   `--tokens` tokens after 32-token prompts (16 x 256 = N), as many golden solutions for stableopd, all in
   one micro-batch unless `--micro-batch` says otherwise, seq_mean. opd and stableopd run twice: pi_old from
   the sampler (the one-pass forward-gradient path, `sampler_is_policy`) and from the trainer (the per-token
   path that top-p sampling takes). Each call runs in a fresh process after a warm-up on two sequences; the
   last column is the naive loss value's relative difference from stableopd's.
Method: contenders alternate over `--rounds` rounds; each keeps its best time and its largest peak. Peak =
resident-set high-water mark during the call minus the resident set before it (models and inputs excluded).
TRL and Liger-Kernel are the optional `bench` extra; a missing one is skipped with a line.
Deviations: none; the paper has no timings.

Command: OMP_NUM_THREADS=1 python benchmarks/compare_peers.py [--rounds 2] [--n 4096] [--skip-losses] [--skip-steps]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import subprocess
import sys
import time

import bench_kernels as bk

D, V, LAYERS, PROMPT = 576, 49152, 2, 32
STEP_RUNS = [
    ("opd", "sampler"),
    ("opd", "trainer"),
    ("stableopd", "sampler"),
    ("stableopd", "trainer"),
    ("jsd", "-"),
]
MIB = 2**20


# ---------------------------------------------------------------- part 2: one update, in a child process


def step_inputs(spec: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stableopd.engine.update import RolloutSeq
    from stableopd.types import GoldSeq

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=4 * D,
        num_hidden_layers=LAYERS,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=False,
    )
    student = LlamaForCausalLM(cfg)
    ref, teacher = copy.deepcopy(student), LlamaForCausalLM(cfg)  # a teacher other than the student
    for m in (ref, teacher):
        m.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, V, (n,), generator=gen).tolist()

    def lps(n: int) -> list[float]:
        return (-torch.rand(n, generator=gen) * 4 - 9).tolist()  # near a uniform token's log(1/V) = -10.8

    t = spec["tokens"]
    rollouts = [
        RolloutSeq(
            prompt=ids(PROMPT), target=ids(t), teacher_lp=lps(t), sampler_lp=lps(t), repetitive=[False] * t
        )
        for _ in range(spec["rollouts"])
    ]
    golds = [GoldSeq(prompt=ids(PROMPT), target=ids(t)) for _ in range(spec["rollouts"])]
    return student, ref, teacher, rollouts, golds


def naive_update(student, ref, teacher, rollouts, golds, s, micro_batch: int) -> float:
    """The update's loss from materialised (B, L, V) logits, padded micro-batches, backward per micro-batch."""
    import torch

    def logp(model, seqs):  # (B, T, V) next-token log-probs at the targets, (B, T) targets, (B, T) mask
        width = max(len(q.prompt) + len(q.target) for q in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        tgt, mask = torch.zeros(len(seqs), width - 1, dtype=torch.long), torch.zeros(len(seqs), width - 1)
        for i, q in enumerate(seqs):
            n = len(q.prompt) + len(q.target)
            ids[i, :n] = torch.tensor(q.prompt + q.target)
            tgt[i, len(q.prompt) - 1 : n - 1] = torch.tensor(q.target)
            mask[i, len(q.prompt) - 1 : n - 1] = 1
        return model(input_ids=ids).logits[:, :-1].float().log_softmax(-1), tgt, mask

    def per_token(seqs, values):  # (B, T) right-aligned per-token values from each sequence's list
        out = torch.zeros(len(seqs), max(len(q.prompt) + len(q.target) for q in seqs) - 1)
        for i, q in enumerate(seqs):
            out[i, len(q.prompt) - 1 : len(q.prompt) - 1 + len(q.target)] = torch.tensor(values(q))
        return out

    total = 0.0
    for start in range(0, len(rollouts), micro_batch):
        mb = rollouts[start : start + micro_batch]
        ls, tgt, mask = logp(student, mb)
        w = mask / torch.tensor([[len(q.target) * len(rollouts)] for q in mb])  # seq_mean
        if s.name == "jsd":
            with torch.no_grad():
                lt = logp(teacher, mb)[0]
            mix = torch.logaddexp(ls, lt) - math.log(2)
            loss = (w * (0.5 * (lt.exp() * (lt - mix)).sum(-1) + 0.5 * (ls.exp() * (ls - mix)).sum(-1))).sum()
        else:
            new = ls.gather(-1, tgt[..., None])[..., 0]
            old = per_token(mb, lambda q: q.sampler_lp) if s.sampler_is_policy else new.detach()
            adv = per_token(mb, lambda q: q.teacher_lp) - old
            loss = -(w * adv * torch.exp(new - new.detach())).sum()
        if s.name != "opd":
            with torch.no_grad():
                lr = logp(ref, mb)[0]
            loss = loss + s.ref_kl_coef * (w * (ls.exp() * (ls - lr)).sum(-1)).sum()
        loss.backward()
        total += float(loss)
    if s.name == "stableopd":
        for start in range(0, len(golds), micro_batch):
            mb = golds[start : start + micro_batch]
            lg, tgt, mask = logp(student, mb)
            w = mask / torch.tensor([[len(g.target) * len(golds)] for g in mb])
            loss = -s.gold_coef * (w * lg.gather(-1, tgt[..., None])[..., 0]).sum()
            loss.backward()
            total += float(loss)
    return total


def step_child(spec: dict) -> dict:
    import torch

    from stableopd.engine.objective import Objective
    from stableopd.engine.update import accumulate

    torch.set_num_threads(spec["threads"])
    student, ref, teacher, rollouts, golds = step_inputs(spec)
    settings = Objective(
        name=spec["objective"], sampler_is_policy=spec["pi_old"] == "sampler", chunk_size=1024
    )

    def call(rollouts, golds) -> float:
        student.zero_grad(set_to_none=True)
        if spec["impl"] == "naive":
            return naive_update(student, ref, teacher, rollouts, golds, settings, spec["micro_batch"])
        return accumulate(
            student, ref, teacher, rollouts, golds, settings, pad_id=0, micro_batch=spec["micro_batch"]
        )["loss/total"]

    call(
        rollouts[:2], golds[:2]
    )  # warm-up on a small batch; its gradients are freed before the measured call
    student.zero_grad(set_to_none=True)
    base, reset_ok = bk._rss(), bk._hwm_reset()
    start, cpu = time.perf_counter(), bk._cpu_seconds()
    value = call(rollouts, golds)
    return {
        "time": time.perf_counter() - start,
        "cpu": bk._cpu_seconds() - cpu,
        "peak": bk._hwm(reset_ok) - base,
        "loss": value,
    }


def measure_step(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- tables


def best(rows: list[dict]) -> dict:
    ok = [r for r in rows if "time" in r]
    return {k: (max if k == "peak" else min)(r[k] for r in ok) for k in ok[0]} if ok else rows[0]


def cells(r: dict, base: dict) -> str:
    if "time" not in r:
        return f"{r.get('error', '-')} | | | |"
    return (
        f"{r['time']:.2f} | {r['time'] / base['time']:.2f}x | {r['peak'] / MIB:,.0f} | "
        f"{r['peak'] / base['peak']:.3f}x |"
    )


LOSS_NAMES = {
    "naive": "naive full logits",
    "fused": "stableopd `linear_{loss}` (per-token)",
    "fused_sum": "stableopd `linear_{loss}_sum`",
    "liger": "Liger-Kernel chunked JSD, torch.compile",
    "trl": "TRL GKD `generalized_jsd_loss`",
}


def losses_table(args) -> None:
    impls = ["naive", "fused", "fused_sum"]
    for peer, module in (("liger", "liger_kernel"), ("trl", "trl")):
        if importlib.util.find_spec(module) is None:
            print(f'{module} is not installed (pip install -e ".[bench]"): its row is skipped')
        else:
            impls.append(peer)
    print(
        f"\nLosses, forward + backward: N={args.n} tokens, d={D}, V={V}, fp32, {args.threads} thread(s); best of "
        f"{args.rounds} alternated rounds\n"
    )
    print("| loss | implementation | time s | vs naive | peak MiB | vs naive |\n|---|---|---|---|---|---|")
    for loss in ("jsd", "kl"):
        res = bk.measure_rounds(loss, impls, args.n, D, V, args, args.rounds)
        for impl, r in res.items():
            print(f"| {loss.upper()} | {LOSS_NAMES[impl].format(loss=loss)} | {cells(r, res['naive'])}")


def steps_table(args) -> None:
    print(
        f"\nOne distill update (forward + backward of every term): 2-layer Llama, d={D}, V={V}; "
        f"{args.rollouts} rollouts x {args.tokens} tokens (+ as many golden solutions for stableopd), micro-batch "
        f"{args.micro_batch or args.rollouts}, fp32, {args.threads} thread(s); best of {args.rounds} alternated rounds\n"
    )
    specs = [
        dict(
            objective=o,
            pi_old=p,
            impl=i,
            rollouts=args.rollouts,
            tokens=args.tokens,
            micro_batch=args.micro_batch or args.rollouts,
            threads=args.threads,
        )
        for o, p in STEP_RUNS
        for i in ("naive", "stableopd")
    ]
    runs: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        for spec in specs if rnd % 2 == 0 else specs[::-1]:
            runs.setdefault((spec["objective"], spec["pi_old"], spec["impl"]), []).append(measure_step(spec))
    print(
        "| objective | pi_old | implementation | time s | vs naive | peak MiB | vs naive | loss rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for o, p in STEP_RUNS:
        naive, ours = best(runs[(o, p, "naive")]), best(runs[(o, p, "stableopd")])
        for name, r in (("naive full logits", naive), ("stableopd", ours)):
            diff = (
                abs(r["loss"] - naive["loss"]) / abs(naive["loss"])
                if "loss" in r and "loss" in naive
                else None
            )
            print(f"| {o} | {p} | {name} | {cells(r, naive)} {'' if diff is None else f'{diff:.1e}'} |")


def machine() -> str:
    import os
    import platform

    import torch

    try:
        name = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return (
        f"{name}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()} kernels)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, help="sequences per forward in the update (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--skip-losses", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step_child(json.loads(args.child))))
        return
    print(f"machine: {machine()}")
    if not args.skip_losses:
        losses_table(args)
    if not args.skip_steps:
        steps_table(args)


if __name__ == "__main__":
    main()
