"""`stableopd sft`: supervised warm start on golden solutions (the paper warm-starts with SFT before OPD).

It shares everything with `distill`: the config, the run directory layout (metrics.jsonl, val/,
checkpoints/ in Hugging Face format with trainer state), the chunked kernels for the cross-entropy, the
data order, validation and exact resume. Each step takes `train.prompts_per_step` examples that have a
golden solution and minimises the token mean NLL per solution, then mean over solutions.

    stableopd sft --student tiny --data "builtin:arith?digits=2" --out runs/sft -s train.steps=50 -s train.lr=1e-3
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from stableopd.checkpoint import save_checkpoint, set_rng_state
from stableopd.config import Config, check_rules
from stableopd.errors import UserError
from stableopd.files import check_free_space, check_output_dir
from stableopd.kernels import make_adamw
from stableopd.progress import console, duration, note, step_display
from stableopd.runctl import GracefulStop, RunLock, Stopped
from stableopd.schedule import set_lr
from stableopd.trackers import check_installed
from stableopd.tracking import MetricsLog
from stableopd.trainer import (
    _start,
    agreed_signal,
    announce,
    build_step_backend,
    checkpoint_bytes,
    guard_from,
    open_trackers,
    prepare,
    print_summary,
    step_indices,
    train_lr,
    write_config,
)
from stableopd.update import GoldSeq, LossSettings, accumulate
from stableopd.validation import validate


def sft_settings(chunk_size: int, vocab_size: int | None) -> LossSettings:
    """The SFT loss as a special case of the step loss: only the golden term, at weight 1."""
    return LossSettings(
        objective="stableopd", gold_coef=1.0, ref_kl_coef=0.0, chunk_size=chunk_size, vocab_size=vocab_size
    )


def sft_step(
    model,
    optimizer,
    golds: list[GoldSeq],
    settings: LossSettings,
    *,
    pad_id: int,
    micro_batch: int,
    grad_clip: float,
) -> dict[str, Any]:
    """One supervised step on golden solutions (also used by stableopd.toy to build the arith models)."""
    t0 = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    m = accumulate(model, None, None, [], golds, settings, pad_id=pad_id, micro_batch=micro_batch)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if torch.isfinite(norm):
        optimizer.step()
    return {
        "loss/total": m.get("loss/gold_sft"),
        "loss/gold_sft": m.get("loss/gold_sft"),
        "optim/grad_norm": float(norm),
        "optim/lr": optimizer.param_groups[0]["lr"],
        "optim/skipped": int(not torch.isfinite(norm)),
        "time/train_s": time.perf_counter() - t0,
    }


def no_solutions(d) -> UserError:
    """The error of an sft run whose data (`DataConfig` d) holds no golden solution."""
    return UserError(
        f"sft needs golden solutions: no example in '{d.source}' has a '{d.solution_field}' field "
        "(set data.solution_field)"
    )


def run_sft(cfg: Config, *, resume: bool = False) -> int:
    run_dir = Path(cfg.out or "runs/sft")
    check_rules(cfg)
    check_output_dir(run_dir, "run directory")
    check_installed(cfg.logging.report_to)
    with RunLock(run_dir), GracefulStop(announce=announce) as stop:
        return _run_sft(cfg, resume, run_dir, stop)


def _run_sft(cfg: Config, resume: bool, run_dir: Path, stop: GracefulStop) -> int:
    restored = _start(cfg, run_dir, resume)
    t0 = time.perf_counter()
    note(f"loading student '{cfg.student.name}' ...", enabled=cfg.logging.progress)
    setup = prepare(
        cfg, student_path=str(restored.path) if restored else None, need_teacher=False, need_ref=False
    )
    note(
        f"loaded in {duration(time.perf_counter() - t0)}: {len(setup.train)} training examples, "
        f"{len(setup.val)} validation prompts",
        enabled=cfg.logging.progress,
    )
    tok = setup.student.tokenizer
    golds_all = setup.golds
    keep = [i for i, g in enumerate(golds_all) if g is not None]
    if not keep:
        raise no_solutions(cfg.data)
    model = setup.student.model
    check_free_space(run_dir, checkpoint_bytes(model), "a checkpoint")
    write_config(run_dir, cfg)
    optimizer = make_adamw(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
    )
    start = 0
    if restored:
        optimizer.load_state_dict(restored.optimizer_state)
        set_rng_state(restored.rng)
        start = restored.step
    else:
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
    settings = sft_settings(cfg.loss.chunk_size, setup.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    backend = build_step_backend(cfg, setup)
    stop.arm()  # from here a first signal lets the loop finish a step and save it
    log = MetricsLog.open(run_dir / "metrics.jsonl", keep_until=start if start else None)
    with open_trackers(cfg, run_dir, start, enabled=True) as trackers:
        log.mirrors.append(trackers.log)
        return _sft_steps(
            cfg,
            setup,
            optimizer,
            backend,
            run_dir,
            start=start,
            stop=stop,
            log=log,
            keep=keep,
            golds_all=golds_all,
            settings=settings,
            pad=pad,
        )


def _sft_steps(
    cfg: Config,
    setup,
    optimizer,
    backend,
    run_dir: Path,
    *,
    start: int,
    stop: GracefulStop,
    log: MetricsLog,
    keep: list[int],
    golds_all,
    settings,
    pad: int,
) -> int:
    tcfg = cfg.train
    model, tok = setup.student.model, setup.student.tokenizer
    if start == 0 and tcfg.eval_every and tcfg.eval_at_start:
        note(f"validating on {len(setup.val)} prompts before training ...", enabled=cfg.logging.progress)
        log.write({"step": 0, **validate(cfg, setup, backend, 0, run_dir)})
    guard = guard_from(cfg)
    t_loop = time.perf_counter()
    with step_display(tcfg.steps, start, enabled=cfg.logging.progress) as show:
        for step in range(start + 1, tcfg.steps + 1):
            idx = [keep[i] for i in step_indices(len(keep), step, tcfg.prompts_per_step, cfg.data.seed)]
            golds = [GoldSeq(prompt=setup.train_ids[i], target=golds_all[i]) for i in idx]
            set_lr(optimizer, train_lr(cfg, step))
            metrics = sft_step(
                model,
                optimizer,
                golds,
                settings,
                pad_id=pad,
                micro_batch=tcfg.micro_batch,
                grad_clip=tcfg.grad_clip,
            )
            if tcfg.eval_every and step % tcfg.eval_every == 0:
                metrics.update(validate(cfg, setup, backend, step, run_dir))
            log.write({"step": step, **metrics})
            show(step, metrics, guard.verdict)
            signum = agreed_signal(stop, None) if step < tcfg.steps else None
            if step % tcfg.save_every == 0 or step == tcfg.steps or signum:
                save_checkpoint(
                    run_dir,
                    step,
                    model=model,
                    tokenizer=tok,
                    optimizer=optimizer,
                    state={"data_position": step * tcfg.prompts_per_step},
                    keep_last=tcfg.keep_last,
                )
            if signum:
                raise Stopped(signum, step)
    print_summary(cfg, log.rows, first_step=start + 1, wall_s=time.perf_counter() - t_loop, run_dir=run_dir)
    console.print(
        f"run directory: {run_dir}\nthe fine-tuned student: {run_dir}/checkpoints/step_{tcfg.steps:06d}",
        highlight=False,
        soft_wrap=True,
    )
    return 0
