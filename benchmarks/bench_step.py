"""Time one distill update (`stableopd.engine.update.accumulate`: forwards, losses, backward) at a model's shape.

Purpose: see what a training step costs at a real vocabulary, per objective, without a hub model: the
student is a random-init Llama of the given shape (default: SmolLM2-135M's d=576, V=49152, with 2 layers
so the head dominates as it does for small students of big-vocabulary families), the reference a copy,
the teacher a copy too (only JSD runs it in the update). The batch: `--rollouts` responses of
`--tokens` tokens after 32-token prompts, and as many golden solutions.

Method: one warm-up call, then `--reps` calls; the best and the median wall time are printed, with the
process's CPU time for the best call. Compare code versions by running this file from two checkouts in
one shell command, alternating, on a quiet machine.
Deviations: none; the paper has no step timings.

Command: python benchmarks/bench_step.py [--objective opd stableopd jsd] [--tokens 224] [--rollouts 8]
         [--pi-old sampler trainer] [--rounds R]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stableopd.engine.objective import Objective
from stableopd.engine.update import RolloutSeq, accumulate
from stableopd.types import GoldSeq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objective", nargs="+", default=["opd", "stableopd", "jsd"])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, default=224)
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternate the rows over this many rounds")
    ap.add_argument(
        "--pi-old",
        nargs="+",
        default=["sampler"],
        choices=["sampler", "trainer"],
        help="where the one-pass OPD term's pi_old comes from: the sampler's log-probs (forward-"
        "gradient kernel) or the trainer's own (per-token kernel, as with top-p sampling)",
    )
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=9 if args.hidden % 9 == 0 else 8,
        num_key_value_heads=3 if args.hidden % 9 == 0 else 4,
        tie_word_embeddings=False,
    )
    student = LlamaForCausalLM(cfg)
    ref, teacher = copy.deepcopy(student).eval(), copy.deepcopy(student).eval()
    for m in (ref, teacher):
        m.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, args.vocab, (n,), generator=gen).tolist()

    rollouts = [
        RolloutSeq(
            prompt=ids(32),
            target=ids(args.tokens),
            teacher_lp=[-1.0] * args.tokens,
            sampler_lp=[-1.0] * args.tokens,
            repetitive=[False] * args.tokens,
        )
        for _ in range(args.rollouts)
    ]
    golds = [GoldSeq(prompt=ids(32), target=ids(args.tokens)) for _ in range(args.rollouts)]

    print(
        f"shape: d={args.hidden} layers={args.layers} V={args.vocab}; {args.rollouts} rollouts + "
        f"{args.rollouts} golden x {args.tokens} tokens, micro-batch {args.micro_batch}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'objective':10s} {'pi_old':8s} {'best s':>8s} {'median s':>9s} {'cpu s (best)':>13s}")
    runs = [(o, p) for o in args.objective for p in (args.pi_old if o != "jsd" else ["-"])]
    for (objective, pi_old), rnd in ((run, r) for r in range(args.rounds) for run in runs):
        settings = Objective(name=objective, chunk_size=args.chunk, sampler_is_policy=pi_old == "sampler")
        walls, cpus = [], []
        for rep in range(args.reps + 1):
            student.zero_grad(set_to_none=True)
            c0, t0 = time.process_time(), time.perf_counter()
            accumulate(
                student, ref, teacher, rollouts, golds, settings, pad_id=0, micro_batch=args.micro_batch
            )
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if rep:  # the first call is the warm-up
                walls.append(wall)
                cpus.append(cpu)
        best = min(range(len(walls)), key=walls.__getitem__)
        print(
            f"{objective:10s} {pi_old:8s} {walls[best]:8.2f} {statistics.median(walls):9.2f} {cpus[best]:13.2f}"
            + (f"   (round {rnd + 1})" if args.rounds > 1 else "")
        )


if __name__ == "__main__":
    main()
