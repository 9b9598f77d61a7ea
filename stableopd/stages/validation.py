"""Validation during `distill`: sample held-out prompts, measure what collapses, check answers.

Every validation uses the same sampling seed, so differences between steps come from the weights, not
from the draw. Generations go to RUN_DIR/val/step_NNNNNN.jsonl with a `correct` field when answers
exist. `val/reverse_kl` is the token mean of the full-vocabulary KL(student || teacher) at the
prefixes of the validation responses: the quantity OPD minimises, measured on held-out prompts.
With K processes each rank samples a contiguous share of the prompts (greedy validation gives the
single-process records; sampled validation draws differently with another K).

    stableopd distill -c examples/smoke.yaml -s train.eval_every=2
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stableopd.engine.teacher import reverse_kl_sums
from stableopd.eval.answers import check
from stableopd.files import write_jsonl_atomic
from stableopd.stages.build import eval_sampling, pad_id_of
from stableopd.stages.rollout import sample_records, summarize

VAL_SEED = 424_242


def validate(cfg, setup, backend, step: int, run_dir: Path, *, write: bool = True) -> dict[str, Any]:
    if not setup.val:
        return {}
    t0 = time.perf_counter()
    tok = setup.student.tokenizer
    pair = setup.pair
    params = eval_sampling(cfg, seed=cfg.sampling.seed + VAL_SEED, banned=pair.banned if pair else ())
    dist = setup.dist  # each rank validates its contiguous share; records are gathered in prompt order
    records = sample_records(
        backend,
        tok,
        dist.split(setup.val),
        dist.split(setup.val_ids),
        params,
        setup.stop_ids,
        rep_tail_chars=cfg.diagnose.rep_tail_chars,
        rep_ratio=cfg.diagnose.rep_ratio,
        progress=False,
    )
    for r in records:
        r.extra["step"] = step
        if r.answer is not None:
            verdict = check(r.response, r.answer, cfg.eval.checker)
            r.extra.update(extracted=verdict.extracted, correct=verdict.correct)
    kl_sums = None
    if setup.teacher is not None and setup.teacher.model is not None:
        targets = [r.target for r in records]
        t_prompts = [p for p in dist.split(setup.teacher_val_ids or []) for _ in range(cfg.eval.n)] or None
        n_batches = int(dist.all_max([-(-len(records) // cfg.train.micro_batch)])[0])
        with dist.gathered_root(setup.teacher.model):
            kl_sums = dist.all_sum(
                list(
                    reverse_kl_sums(
                        setup.student.model,
                        setup.teacher.model,
                        [r.prompt_token_ids for r in records],
                        targets,
                        pad_id=pad_id_of(tok),
                        micro_batch=cfg.train.micro_batch,
                        chunk_size=cfg.loss.chunk_size,
                        vocab_size=setup.vocab_size,
                        n_batches=n_batches if dist.active else None,
                        teacher_prompts=t_prompts,
                        swaps=pair.swaps if pair else (),
                    )
                )
            )
    records = dist.concat(records)
    if write:  # False on ranks other than 0 of a multi-process run
        write_jsonl_atomic(run_dir / "val" / f"step_{step:06d}.jsonl", (r.to_json() for r in records))
    s = summarize(records)
    out: dict[str, Any] = {
        "val/length_mean": s["length_mean"],
        "val/trunc_rate": s["trunc_rate"],
        "val/rep_rate": s["rep_rate"],
    }
    checked = [r.extra["correct"] for r in records if "correct" in r.extra]
    if checked:
        out["val/accuracy"] = sum(checked) / len(checked)
    if kl_sums is not None:
        out["val/reverse_kl"] = kl_sums[0] / kl_sums[1] if kl_sums[1] else None
    out["time/val_s"] = time.perf_counter() - t0
    return out
