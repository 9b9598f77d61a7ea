"""`stableopd sft`: supervised warm start on golden solutions (the paper warm-starts with SFT before OPD).

The objective with only the golden term (`Objective.sft`), run by the same training stage as `distill`
(training.py): config, run directory (metrics.jsonl, val/, checkpoints/ in Hugging Face format with trainer
state), chunked kernels, data order, validation, exact resume and `--nproc`. Each step takes
`train.prompts_per_step` examples that have a golden solution and minimises the token mean NLL per solution,
then the mean over solutions.

    stableopd sft --student tiny --data "builtin:arith?digits=2" --out runs/sft -s train.steps=50 -s train.lr=1e-3
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stableopd.config import Config
from stableopd.core.schedule import set_lr
from stableopd.data.sources import step_indices
from stableopd.engine.objective import Objective
from stableopd.errors import UserError
from stableopd.stages.training import Records, Setup, Stage, run_stage, train_lr, update
from stableopd.types import GoldSeq

# the metrics an sft step logs (the rest of the update's are about rollouts)
LOGGED = ("loss/total", "loss/gold_sft", "optim/grad_norm", "optim/skipped", "optim/lr")


def run_sft(cfg: Config, *, resume: bool = False) -> int:
    return run_stage(cfg, SFT, resume=resume)


def sft_step(
    cfg: Config, setup: Setup, backend, optimizer, step: int, *, objective: Objective
) -> tuple[dict[str, Any], Records]:
    """One supervised step on the step's golden solutions; no rollouts."""
    t0 = time.perf_counter()
    keep = with_solutions(setup)
    idx = setup.dist.split(
        [keep[i] for i in step_indices(len(keep), step, cfg.train.prompts_per_step, cfg.data.seed)]
    )
    golds = [GoldSeq(prompt=setup.train_ids[i], target=setup.golds[i]) for i in idx]
    set_lr(optimizer, train_lr(cfg, step))
    metrics = update(cfg, setup, optimizer, [], golds, objective, [], [])
    out = {k: metrics[k] for k in LOGGED}
    out["time/train_s"] = float(setup.dist.all_max([time.perf_counter() - t0])[0])
    setup.student.model.train()
    return out, []


def with_solutions(setup: Setup) -> list[int]:
    """The training examples that have a golden solution, in order."""
    return [i for i, g in enumerate(setup.golds) if g is not None]


def check_solutions(cfg: Config, setup: Setup) -> None:
    if not with_solutions(setup):
        raise no_solutions(cfg.data)


def no_solutions(d) -> UserError:
    """The error of an sft run whose data (`DataConfig` d) holds no golden solution."""
    return UserError(
        f"sft needs golden solutions: no example in '{d.source}' has a '{d.solution_field}' field "
        "(set data.solution_field)"
    )


def objective_of(cfg: Config) -> Objective:
    return Objective.sft(chunk_size=cfg.loss.chunk_size, vocab_size=None)


def closing(run_dir: Path, cfg: Config) -> str:
    return (
        f"run directory: {run_dir}\nthe fine-tuned student: {run_dir}/checkpoints/step_{cfg.train.steps:06d}"
    )


SFT = Stage(
    name="sft",
    items="examples",
    objective=objective_of,
    step=sft_step,
    closing=closing,
    check=check_solutions,
)
