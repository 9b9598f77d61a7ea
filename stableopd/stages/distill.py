"""`stableopd distill`: the on-policy distillation step, run by the shared training stage (training.py).

Each step: take `train.prompts_per_step` prompts, sample `sampling.n` rollouts per prompt from the current
student, score every sampled token with the teacher (no gradient), then `update.accumulate` the loss over
micro-batches and take one optimizer step (or `train.epochs_per_batch` steps on the same batch, with
pi_old frozen before the first and the clipped surrogate). After each step the collapse guard reads the
rollouts' truncation and repetition, and a sampler whose log-probs drift from the trainer's stops the run.

Deviations from the paper: the paper does not say whether the stop token is trained; here it is (the
teacher's view of when to stop is what length inflation is about). pi_ref for the KL term is the
student as loaded at the start of the run (also after a resume), i.e. the warm-started student.

    stableopd distill --student tiny --teacher tiny-teacher --out runs/smoke -s train.steps=4
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stableopd.config import Config
from stableopd.core.repetition import repetitive_token_mask
from stableopd.core.schedule import set_lr
from stableopd.data.sources import step_indices
from stableopd.engine.distributed import maybe_fail
from stableopd.engine.objective import Objective
from stableopd.engine.teacher import score_targets
from stableopd.engine.update import RolloutSeq
from stableopd.errors import TrainingStopped
from stableopd.models.pairing import TokenPair
from stableopd.stages.build import pad_id_of, train_sampling
from stableopd.stages.rollout import sample_records, summarize
from stableopd.stages.training import Setup, Stage, run_stage, train_lr, update
from stableopd.types import GoldSeq, Rollout, SamplingParams


def run_distill(cfg: Config, *, resume: bool = False) -> int:
    return run_stage(cfg, DISTILL, resume=resume)


def objective_of(cfg: Config) -> Objective:
    return Objective.from_loss(cfg.loss, multi_pass=cfg.train.epochs_per_batch > 1)


def sampling_params(cfg: Config, step: int, pair: TokenPair | None = None) -> SamplingParams:
    return train_sampling(cfg, step, banned=pair.banned if pair else ())


def train_step(
    cfg: Config,
    setup: Setup,
    backend,
    optimizer,
    step: int,
    *,
    objective: Objective,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One distillation step: sample, score, update. Returns (metrics, the global batch's records as the
    rollouts file holds them)."""
    tok, model = setup.student.tokenizer, setup.student.model
    dist = setup.dist
    maybe_fail(dist.rank, step)
    idx = dist.split(step_indices(len(setup.train), step, cfg.train.prompts_per_step, cfg.data.seed))
    exs, pids = [setup.train[i] for i in idx], [setup.train_ids[i] for i in idx]
    t0 = time.perf_counter()
    records = sample_records(
        backend,
        tok,
        exs,
        pids,
        sampling_params(cfg, step, setup.pair),
        setup.stop_ids,
        rep_tail_chars=cfg.diagnose.rep_tail_chars,
        rep_ratio=cfg.diagnose.rep_ratio,
        progress=False,
    )
    t1 = time.perf_counter()
    targets = [r.target for r in records]
    prompts = [r.prompt_token_ids for r in records]
    t_prompts, t_targets = teacher_view(setup, idx, records, targets, cfg.sampling.n)
    if objective.teacher_in_update:  # the update runs the teacher for the JSD and reads its log-probs there
        teacher_lp = [None] * len(records)
    elif setup.teacher_scorer is not None:
        teacher_lp = setup.teacher_scorer.score(
            t_prompts, t_targets, temperature=cfg.loss.teacher_temperature
        )
    else:
        with dist.gathered_root(setup.teacher.model):
            teacher_lp = score_targets(
                setup.teacher.model,
                t_prompts,
                t_targets,
                pad_id=pad_id_of(tok),
                micro_batch=cfg.train.micro_batch,
                chunk_size=cfg.loss.chunk_size,
                vocab_size=setup.vocab_size,
                temperature=cfg.loss.teacher_temperature,
            )
    t2 = time.perf_counter()
    ngram = cfg.diagnose.rep_token_ngram
    rollouts = [
        RolloutSeq(
            prompt=p,
            target=t,
            teacher_lp=tl,
            repetitive=repetitive_token_mask(t, ngram),
            sampler_lp=r.target_logprobs,
            teacher_prompt=None if tp == p else tp,
            teacher_target=None if tt == t else tt,
        )
        for p, t, tl, r, tp, tt in zip(prompts, targets, teacher_lp, records, t_prompts, t_targets)
    ]
    golds = [GoldSeq(prompt=setup.train_ids[i], target=g) for i in idx if (g := setup.golds[i]) is not None]
    set_lr(optimizer, train_lr(cfg, step))
    metrics = update(cfg, setup, optimizer, rollouts, golds, objective, prompts, targets)
    t3 = time.perf_counter()
    for r, q, tp, tt in zip(records, rollouts, t_prompts, t_targets):
        r.extra.update(
            teacher_logprobs=q.teacher_lp[: r.n_tokens],
            teacher_prompt_token_ids=tp,
            teacher_stop_token_id=None if r.truncated else tt[-1],
            step=step,
        )
    records = dist.concat(records)  # every rank gets the global batch's records, in single-process order
    summary = summarize(records)
    n_gold, n_idx = dist.all_sum([len(golds), len(idx)])
    in_update = metrics.pop("time/teacher_s")  # the teacher's forwards inside the update (JSD)
    times = dist.all_max([t1 - t0, t2 - t1 + in_update, t3 - t2 - in_update])
    metrics.update(
        {
            "rollout/length_mean": summary["length_mean"],
            "rollout/length_max": summary["length_max"],
            "rollout/trunc_rate": summary["trunc_rate"],
            "rollout/rep_rate": summary["rep_rate"],
            "data/gold_count": int(n_gold),
            "data/gold_missing": int(n_idx - n_gold),
            "time/rollout_s": times[0],
            "time/teacher_s": times[1],
            "time/train_s": times[2],
        }
    )
    model.train()
    return metrics, [r.to_json() for r in records]


def teacher_view(
    setup: Setup, idx: list[int], records: list[Rollout], targets: list[list[int]], n: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each record's prompt in the teacher's own template and its target with the stop token mapped
    (records come n per prompt, in the order of idx)."""
    if setup.teacher_train_ids is None:
        prompts = [r.prompt_token_ids for r in records]
    else:
        if len(records) != len(idx) * n:
            raise RuntimeError(f"{len(records)} rollouts for {len(idx)} prompts x {n} samples")
        prompts = [setup.teacher_train_ids[i] for i in idx for _ in range(n)]
    pair = setup.pair
    mapped = [pair.teacher_target(t, not r.truncated) if pair else t for t, r in zip(targets, records)]
    return prompts, mapped


def check_sync(cfg: Config, metrics: dict[str, Any]) -> None:
    """Stop when the sampler's log-probs disagree with the trainer's: the sampler has other weights.

    Only comparable when the sampler draws from the untempered, unfiltered distribution.
    """
    s = cfg.sampling
    mismatch = metrics.get("diag/kl_sample_train")
    if s.max_sync_mismatch == 0 or mismatch is None or (s.temperature, s.top_p, s.top_k) != (1.0, 1.0, 0):
        return
    if abs(mismatch) > s.max_sync_mismatch:
        raise TrainingStopped(
            f"sampler and trainer log-probs of the sampled tokens differ by {mismatch:+.4f} nats "
            f"per token (limit sampling.max_sync_mismatch={s.max_sync_mismatch}): the "
            f"'{s.backend}' sampler is not sampling from the trained weights (weight sync failed)"
        )


def closing(run_dir: Path, cfg: Config) -> str:
    return (
        f"run directory: {run_dir}\nlook at it with: stableopd diagnose {run_dir}\n(it writes plots and "
        f"report.md to {run_dir / 'report'})"
    )


DISTILL = Stage(
    name="distill",
    items="prompts",
    objective=objective_of,
    step=train_step,
    closing=closing,
    after_step=check_sync,
)
