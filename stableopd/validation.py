"""Validation during `distill`: sample held-out prompts, measure what collapses, check answers.

Every validation uses the same sampling seed, so differences between steps come from the weights, not
from the draw. Generations go to RUN_DIR/val/step_NNNNNN.jsonl with a `correct` field when answers
exist. `val/reverse_kl` is the token mean of the full-vocabulary KL(student || teacher) at the
prefixes of the validation responses: the quantity OPD minimises, measured on held-out prompts.

    stableopd distill -c examples/smoke.yaml -s train.eval_every=2
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stableopd.answers import check
from stableopd.backends.base import SamplingParams
from stableopd.rollout import sample_records, summarize, write_jsonl_atomic
from stableopd.teacher import mean_reverse_kl

VAL_SEED = 424_242


def validate(cfg, setup, backend, step: int, run_dir: Path, *, write: bool = True) -> dict[str, Any]:
    if not setup.val:
        return {}
    t0 = time.perf_counter()
    tok = setup.student.tokenizer
    params = SamplingParams(n=cfg.eval.n, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=0,
                            max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                            seed=cfg.sampling.seed + VAL_SEED)
    records = sample_records(backend, tok, setup.val, setup.val_ids, params, setup.stop_ids,
                             rep_tail_chars=cfg.diagnose.rep_tail_chars, rep_ratio=cfg.diagnose.rep_ratio,
                             progress=False)
    checked = [r for r in records if r.get("answer") is not None]
    for r in checked:
        verdict = check(r["response"], r["answer"], cfg.eval.checker)
        r["extracted"], r["correct"] = verdict.extracted, verdict.correct
    for r in records:
        r["step"] = step
    if write:  # False on ranks other than 0 of a multi-process run
        write_jsonl_atomic(run_dir / "val" / f"step_{step:06d}.jsonl", records)
    s = summarize(records)
    out: dict[str, Any] = {"val/length_mean": s["length_mean"], "val/trunc_rate": s["trunc_rate"],
                           "val/rep_rate": s["rep_rate"]}
    if checked:
        out["val/accuracy"] = sum(r["correct"] for r in checked) / len(checked)
    if setup.teacher is not None and setup.teacher.model is not None:
        targets = [r["response_token_ids"] + ([] if r["truncated"] else [r["stop_token_id"]]) for r in records]
        out["val/reverse_kl"] = mean_reverse_kl(
            setup.student.model, setup.teacher.model, [r["prompt_token_ids"] for r in records], targets,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            micro_batch=cfg.train.micro_batch, chunk_size=cfg.loss.chunk_size, vocab_size=setup.vocab_size)
    out["time/val_s"] = time.perf_counter() - t0
    return out
