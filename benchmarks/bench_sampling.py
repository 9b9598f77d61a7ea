"""Tokens per second of the hf backend against a raw `model.generate` call at identical settings.

Purpose: show what the backend costs over the library call it wraps, and what its `cache` / `compile`
options (sampling.options) buy. Models: `arith-student` on one quickstart step (16 training prompts x 4
samples, 96 new tokens, temperature 1, top_p 0.95, one generate call of 64 rows) and `smollm2-135m` on the
three prompts of examples/prompts.jsonl's shape (`--smol-rows` rows, `--smol-tokens` new tokens).
Contenders, all on the same loaded model, in one process:
    raw generate         model.generate(do_sample, temperature, top_p, top_k off, max_new_tokens, eos/pad ids,
                         output_scores) with the backend's logits mask, seeded as the backend seeds its call
    hf                   HFBackend.generate with default options (records excluded: they cost about 5 ms)
    hf cache=static      cache: static
    hf static+compile    cache: static, compile: true (the first call compiles; its time is printed apart)
Method: contenders alternate over `--reps` rounds after a warm-up round (odd rounds reversed); the median
call time is kept; tokens = the sampled tokens up to and including each row's stop token. tokens/s ratio =
(tokens / median time) over raw generate's. The raw call and the backend draw the same tokens (checked and
printed), so the ratio compares equal work.
Deviations: none; the paper has no sampler timings.

Command: OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py [--models arith-student smollm2-135m] [--reps 5]
         [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stableopd.backends.base import build_backend
from stableopd.backends.hf import _MaskTokens
from stableopd.models.loading import load_model, stop_token_ids
from stableopd.types import SamplingParams

SMOL_PROMPTS = [
    "What is 12+345? Explain every step, then give the answer.",
    "Name three colours.",
    "Write one sentence about the sea.",
]


def workload(name: str, args) -> tuple[object, list[list[int]], SamplingParams]:
    """The model, one call's prompts (each once; params.n repeats them) and the sampling settings."""
    if name == "arith-student":
        import compare_trl

        rows, cfg = compare_trl.step_prompts(1, 0)
        loaded = load_model(cfg.student.name, dtype="float32", device="cpu")
        params = SamplingParams(
            n=cfg.sampling.n,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            max_new_tokens=cfg.sampling.max_new_tokens,
            seed=1,
        )
        return loaded, rows[:: cfg.sampling.n], params
    from stableopd.data.sources import encode_prompts
    from stableopd.types import Example

    loaded = load_model(name, dtype="float32", device="cpu")
    prompts = [SMOL_PROMPTS[i % len(SMOL_PROMPTS)] for i in range(args.smol_rows)]
    ids = encode_prompts(loaded.tokenizer, [Example(str(i), p) for i, p in enumerate(prompts)])
    return (
        loaded,
        ids,
        SamplingParams(n=1, temperature=1.0, top_p=0.95, max_new_tokens=args.smol_tokens, seed=1),
    )


def measure(name: str, args) -> None:
    loaded, prompts, params = workload(name, args)
    model, tok = loaded.model.eval(), loaded.tokenizer
    stops = stop_token_ids(tok, model)
    options = {"hf": {}, "hf cache=static": {"cache": "static"}}
    if not args.no_compile:
        options["hf static+compile"] = {"cache": "static", "compile": True}
    backends = {
        k: build_backend(
            "hf",
            model=model,
            tokenizer=tok,
            model_path=loaded.path,
            stop_ids=stops,
            options={"batch_size": len(prompts), **o},
        )
        for k, o in options.items()
    }
    hf = backends["hf"]
    ids, mask = hf._left_pad([p for p in prompts for _ in range(params.n)])
    config = hf._gen_config(params)
    seed = params.seed * 100_003  # the backend's seed for its first (here: only) batch
    tokens: dict[str, int] = {}
    drawn: dict[str, list[list[int]]] = {}

    def raw():
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=[_MaskTokens(len(tok), ())],
            )
        gen = out.sequences[:, ids.shape[1] :].tolist()
        return [row[: next((t + 1 for t, x in enumerate(row) if x in stops), len(row))] for row in gen]

    def backend(b):
        return lambda: [s.token_ids for group in b.generate(prompts, params) for s in group]

    runs = {"raw generate": raw, **{k: backend(b) for k, b in backends.items()}}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps + 1):
        for key, fn in list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]:
            t0 = time.perf_counter()
            drawn[key] = fn()
            seconds = time.perf_counter() - t0
            if rep:
                times[key].append(seconds)
            else:
                first[key] = seconds
            tokens[key] = sum(map(len, drawn[key]))
    same = {k: drawn[k] == drawn["raw generate"] for k in runs}
    print(
        f"\n{name}: {ids.shape[0]} rows, {params.max_new_tokens} new tokens, top_p {params.top_p}; "
        f"{torch.get_num_threads()} torch threads; median of {args.reps} alternated calls"
    )
    print("| sampler | first call s | median s | tokens | tokens/s | vs raw generate | same tokens as raw |")
    print("|---|---|---|---|---|---|---|")
    base = tokens["raw generate"] / statistics.median(times["raw generate"])
    for key in runs:
        med = statistics.median(times[key])
        rate = tokens[key] / med
        print(
            f"| {key} | {first[key]:.2f} | {med:.3f} | {tokens[key]} | {rate:.0f} | {rate / base:.2f}x | "
            f"{'yes' if same[key] else 'no'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["arith-student", "smollm2-135m"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smol-rows", type=int, default=8)
    ap.add_argument("--smol-tokens", type=int, default=64)
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the compiled contender (a minute to compile)"
    )
    args = ap.parse_args()
    for name in args.models:
        measure(name, args)


if __name__ == "__main__":
    main()
