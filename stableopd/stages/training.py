"""The run every training command shares: run directory, lock and signals, one or K processes, models and
data, optimizer, validation, checkpoints, exact resume, guards, metrics and trackers. A `Stage` brings the
rest: its objective (engine.objective), its step and its closing line; `distill` and `sft` are the two.

A step's data position is a function of the step (a seeded permutation per data epoch), sampling seeds too,
and checkpoints carry weights, optimizer and RNG state, so a run killed at any point and resumed ends with the
same metrics and weights as one that never stopped (on CPU, same seed).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stableopd.config import Config, check_rules, dump_config
from stableopd.core.detector import CollapseGuard
from stableopd.core.schedule import lr_at_step
from stableopd.data.sources import examples_for, keep_for_training, kept_note, solution_ids
from stableopd.diagnostics.profile import StepClock
from stableopd.engine import lora
from stableopd.engine.checkpoint import list_checkpoints, load_latest, save_checkpoint, set_rng_state
from stableopd.engine.distributed import (
    SINGLE,
    Dist,
    check_launch,
    from_env,
    launched_world,
    maybe_delay,
    memory_plan,
)
from stableopd.engine.objective import Objective
from stableopd.engine.optimizer import make_adamw
from stableopd.engine.runctl import GracefulStop, RunLock, Stopped
from stableopd.engine.teacher import score_targets
from stableopd.engine.trackers import Trackers, check_installed
from stableopd.engine.tracking import MetricsLog
from stableopd.engine.update import optimizer_step
from stableopd.errors import CollapseStop, TrainingStopped, UserError
from stableopd.files import check_free_space, check_output_dir, write_jsonl_atomic, write_text_atomic
from stableopd.models.loading import (
    BUILTINS,
    Loaded,
    check_compatible,
    check_scorer,
    load_generation_config,
    load_tokenizer,
    overridden_config,
    resolve_model_path,
    stop_token_ids,
)
from stableopd.models.pairing import TokenPair, pair_tokens, stop_ids
from stableopd.progress import console, duration, note, run_summary
from stableopd.stages.build import encode, load_spec, pad_id_of, sampler
from stableopd.stages.validation import validate
from stableopd.types import Example

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """What a training command adds to the shared run."""

    name: str  # the command; its run directory defaults to runs/<name>
    items: str  # what a training example is to it, for the loading line: "prompts", "examples"
    objective: Callable[[Config], Objective]
    # one step: (cfg, setup, backend, optimizer, step, objective=...) -> (metrics, rollout records)
    step: Callable[..., tuple[dict[str, Any], Records]]
    closing: Callable[[Path, Config], str]  # the run's last lines
    check: Callable[[Config, Any], None] = lambda cfg, setup: None  # the loaded setup, before any step
    after_step: Callable[[Config, dict[str, Any]], None] = lambda cfg, metrics: None  # once the row is logged


@dataclass
class Setup:
    student: Loaded
    teacher: Loaded | None
    ref: Loaded | None
    vocab_size: int
    stop_ids: list[int]
    train: list[Example]
    train_ids: list[list[int]]
    val: list[Example]
    val_ids: list[list[int]]
    teacher_scorer: Any = None  # backends.vllm.VLLMScorer when teacher.engine == "vllm"
    dist: Dist = SINGLE  # the process group (stableopd/engine/distributed.py); SINGLE for one process
    pair: TokenPair | None = None  # how the teacher reads the student's tokens (stableopd/models/pairing.py)
    teacher_train_ids: list[list[int]] | None = None  # the prompts in the teacher's own chat template
    teacher_val_ids: list[list[int]] | None = None
    golds: list[list[int] | None] | None = (
        None  # each training example's golden target (stop token last) or None
    )


def _examples(cfg: Config, split: str, source: str, limit: int | None) -> list[Example]:
    return examples_for(cfg.data, source=source, split=split, limit=limit)


def prepare(cfg: Config, *, student_path: str | None, need_teacher: bool, need_ref: bool) -> Setup:
    """Load models and data and run every pre-flight check before any compute; the student-teacher pairing
    (stableopd/models/pairing.py) is checked from the tokenizers before any weights load."""
    d = cfg.data
    train = _examples(cfg, d.split, d.source, d.limit)
    val = _examples(cfg, d.val_split, d.val_source or d.source, d.val_limit) if cfg.train.eval_every else []
    spec = cfg.student
    if spec.lora:
        lora.import_peft()  # a missing peft is found before any model loads
    # a LoRA run resumes from its base model plus the checkpoint's adapter; a full run from the checkpoint
    s_name = cfg.student.name if spec.lora else student_path or cfg.student.name
    s_tok = load_tokenizer(s_name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    # before any prompt is indexed, so steps sample kept examples only; their solutions' ids when tokenised
    train, solutions = keep_training(cfg, train, s_tok)
    pair, t_tok = _pair(cfg, s_name, s_tok) if need_teacher else (None, None)
    student = load_spec(cfg.student, name=s_name, tokenizer=s_tok)
    if spec.lora:
        student.model = lora.attach(
            student.model, spec.lora, base_name=spec.name, adapter_dir=student_path, seed=cfg.train.seed
        )
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    teacher, scorer = _load_teacher(cfg, t_tok) if need_teacher else (None, None)
    ref = load_spec(cfg.student) if need_ref and not spec.lora else None
    vocab = len(student.tokenizer) if pair is None else pair.vocab_size
    if ref is not None:
        vocab = min(vocab, check_compatible(student, ref, chat_template=d.chat_template))
    for m in (teacher, ref):
        if m is not None and m.model is not None:
            m.model.requires_grad_(False)
    if need_ref and spec.lora:  # the initial student is the student with its adapter off: no second copy
        ref = Loaded(
            name=spec.name,
            path=student.path,
            model=lora.AdapterOff(student.model),
            tokenizer=student.tokenizer,
        )
    if teacher is not None:
        check_scorer(student, "student", vocab, chat_template=d.chat_template)
        check_scorer(teacher, "teacher", vocab, chat_template=d.chat_template)
    train_ids = encode(cfg, student.tokenizer, train)
    val_ids = encode(cfg, student.tokenizer, val)
    t_ids = (
        (encode(cfg, teacher.tokenizer, train), encode(cfg, teacher.tokenizer, val))
        if teacher is not None
        else (None, None)
    )
    sides = [("student", student, train_ids, val_ids)]
    if teacher is not None and teacher.model is not None:  # it reads its own (possibly longer) prompts
        sides.append(("teacher", teacher, *t_ids))
    for role, m, tr_ids, v_ids in sides:
        limit = getattr(m.model.config, "max_position_embeddings", None)
        budgets = (
            ("sampling.max_new_tokens", tr_ids, cfg.sampling.max_new_tokens),  # validation samples
            ("eval.max_new_tokens", v_ids, cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens),
        )
        for key, ids, budget in budgets:
            longest = max((len(p) for p in ids), default=0) + budget
            if limit and ids and longest > limit:
                raise UserError(
                    f"prompt + {key} reaches {longest} tokens, over the {role}'s context of {limit}; "
                    f"shorten prompts (data.max_prompt_tokens) or lower {key}"
                )
    stops = list(pair.student_stops) if pair else stop_token_ids(student.tokenizer, student.model)
    if t_ids == (train_ids, val_ids):  # the same template: the teacher reads the student's own prompt ids
        t_ids = (None, None)
    eos = stops[0] if stops else student.tokenizer.eos_token_id
    if solutions is None:
        solutions = solution_ids(student.tokenizer, train)
    golds = [None if ids is None else ids + [eos] for ids in solutions]
    return Setup(
        student,
        teacher,
        ref,
        vocab,
        stops,
        train,
        train_ids,
        val,
        val_ids,
        scorer,
        pair=pair,
        teacher_train_ids=t_ids[0],
        teacher_val_ids=t_ids[1],
        golds=golds,
    )


def _pair(cfg: Config, student_name: str, student_tok) -> tuple[TokenPair, Any]:
    """How the teacher reads the student's tokens, from the tokenizers and generation configs alone; and the
    teacher's tokenizer."""
    t, spec = cfg.teacher, cfg.student
    t_tok = load_tokenizer(t.name, revision=t.revision, trust_remote_code=t.trust_remote_code)
    gen = load_generation_config(
        student_name, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    pair = pair_tokens(
        student_tok,
        t_tok,
        student_stops=stop_ids(student_tok, gen),
        chat_template=cfg.data.chat_template,
        teacher_end=t.end_token,
        mismatched=t.mismatched_tokens,
        names=(spec.name, t.name),
    )
    if not pair.identity or pair.banned:
        mapped = ", ".join(
            f"{student_tok.convert_ids_to_tokens(a)} -> {t_tok.convert_ids_to_tokens(b)}"
            for a, b in pair.stop_map.items()
            if a != b
        )
        note(
            f"teacher '{t.name}' is scored on its own end token where the student stops ({mapped or 'same ids'})"
            + (
                f"; {len(pair.banned)} token ids the two read differently are never sampled"
                if pair.banned
                else ""
            )
        )
    return pair, t_tok


def enable_checkpointing(loaded: Loaded) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers' own
    non-reentrant checkpointing; it acts in train mode only, so sampling and scoring are unchanged)."""
    model = loaded.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"train.gradient_checkpointing: the student '{loaded.name}' "
            f"({type(model).__name__}) does not support gradient checkpointing"
        )
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_teacher(cfg: Config, tokenizer) -> tuple[Loaded, Any]:
    """The HF teacher, or (tokenizer-only Loaded, VLLMScorer) when teacher.engine is vllm."""
    spec = cfg.teacher
    if spec.engine == "hf":
        return load_spec(spec, tokenizer=tokenizer), None
    from stableopd.backends.vllm import VLLMScorer

    path = resolve_model_path(spec.name)
    overrides = (
        overridden_config(
            path,
            spec.config_overrides,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            key="teacher.config_overrides",
        )[1]
        if spec.config_overrides
        else {}
    )
    return (
        Loaded(name=spec.name, path=path, model=None, tokenizer=tokenizer),
        VLLMScorer(path, spec.engine_options, hf_overrides=overrides),
    )


def bind(objective: Objective, cfg: Config, vocab_size: int, pair: TokenPair | None = None) -> Objective:
    """The run's objective bound to the loaded models: their vocabulary, the teacher's swapped columns, and
    whether the sampler draws from the policy itself."""
    swaps = pair.swaps if pair else ()
    return objective.bound(vocab_size, swaps=swaps, sampler_is_policy=sampler_is_policy(cfg, pair))


def sampler_is_policy(cfg: Config, pair: TokenPair | None) -> bool:
    """The sampler draws from the trained policy itself, so its log-probs are pi_theta's: temperature 1, no
    top-p / top-k truncation, no banned ids. (`sampling.max_sync_mismatch` stops a run where they are not.)"""
    s = cfg.sampling
    return s.temperature == 1.0 and s.top_p == 1.0 and s.top_k == 0 and not (pair and pair.banned)


def keep_training(
    cfg: Config, train: list[Example], tokenizer
) -> tuple[list[Example], list[list[int] | None] | None]:
    """The training examples that data.solution_correct_field and data.max_solution_tokens keep, with one note
    line, and the kept solutions' token ids when the length rule tokenised them (else None); with both keys
    unset, `train` itself and nothing tokenised."""
    d = cfg.data
    verified_only, max_tokens = d.solution_correct_field is not None, d.max_solution_tokens
    if not verified_only and max_tokens is None:
        return train, None
    solutions = None if max_tokens is None else solution_ids(tokenizer, train)
    n_tokens = None if solutions is None else [None if ids is None else len(ids) for ids in solutions]
    kept = keep_for_training(train, n_tokens, verified_only=verified_only, max_tokens=max_tokens)
    note(
        kept_note(kept, verified_only=verified_only, max_tokens=max_tokens),
        enabled=cfg.logging.progress and os.environ.get("RANK", "0") == "0",
    )  # one line, not one per rank
    if solutions is not None:
        chosen = {id(ex) for ex in kept.examples}
        solutions = [ids for ex, ids in zip(train, solutions) if id(ex) in chosen]
    return kept.examples, solutions


def _start(cfg: Config, run_dir: Path, resume: bool):
    if resume:
        restored = load_latest(run_dir, warn=lambda m: console.print(f"[yellow]warning:[/] {m}"))
        console.print(f"resuming from {restored.path}", highlight=False, soft_wrap=True)
        return restored
    check_fresh(run_dir)
    return None


def check_fresh(run_dir: Path) -> None:
    """A new run may start in `run_dir`: it holds no run (with or without checkpoints)."""
    if list_checkpoints(run_dir):
        raise UserError(
            f"run directory '{run_dir}' already holds a run; pass --resume to continue it "
            "or --out to start a new one"
        )
    if (
        run_dir / "metrics.jsonl"
    ).exists():  # --resume would fail too: say so rather than send the user there
        raise UserError(
            f"run directory '{run_dir}' holds a run that stopped before its first checkpoint, so it "
            "cannot be resumed; pass another --out, or delete the directory to start over"
        )


def announce(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.yaml, replaced atomically (a kill never leaves half a config for --resume)."""
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))


def checkpoint_bytes(model) -> int:
    """About one checkpoint's size: the weights plus Adam's two fp32 moments per trainable parameter."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(8 * p.numel() for p in model.parameters() if p.requires_grad)


def run_stage(cfg: Config, stage: Stage, *, resume: bool = False) -> int:
    """Run `stage` in cfg.out (default runs/<stage.name>), on this process or, under torchrun, on each rank."""
    objective = stage.objective(cfg)
    if launched_world() > 1:
        # build uncached built-ins before the process group exists: transformers' save_pretrained writes
        # nothing on a rank other than 0 once torch.distributed is initialised (a lock lets one rank build)
        for name in (cfg.student.name, cfg.teacher.name) if objective.needs_teacher else (cfg.student.name,):
            if name in BUILTINS:
                resolve_model_path(name)
    dist = from_env(cfg.train.dist_timeout_s)
    try:
        code = _run(cfg, stage, objective, resume, dist)
        dist.barrier()  # no rank tears the group down while another still finishes its last collective
        return code
    finally:
        dist.close()


def _run(cfg: Config, stage: Stage, objective: Objective, resume: bool, dist: Dist) -> int:
    run_dir = Path(cfg.out or f"runs/{stage.name}")
    check_rules(cfg)
    check_launch(dist.world, cfg)
    check_installed(cfg.logging.report_to)
    if dist.is_main:
        check_output_dir(run_dir, "run directory")
    with (
        RunLock(run_dir) if dist.is_main else nullcontext(),
        GracefulStop(announce=announce if dist.is_main else None) as stop,
    ):
        return _run_locked(cfg, stage, objective, resume, dist, run_dir, stop)


def _run_locked(
    cfg: Config,
    stage: Stage,
    objective: Objective,
    resume: bool,
    dist: Dist,
    run_dir: Path,
    stop: GracefulStop,
) -> int:
    restored = _start(cfg, run_dir, resume)
    dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    need_ref = objective.uses_ref
    maybe_delay(dist.rank)
    chatty = cfg.logging.progress and dist.is_main
    t0 = time.perf_counter()
    ref_note = (
        " (the reference: the student with its LoRA adapter off)"
        if cfg.student.lora
        else " and the reference (a frozen copy of the student)"
    )
    teacher_note = f", teacher '{cfg.teacher.name}'" if objective.needs_teacher else ""
    note(
        f"loading student '{cfg.student.name}'{teacher_note}{ref_note if need_ref else ''} ...",
        enabled=chatty,
    )
    setup = prepare(
        cfg,
        student_path=str(restored.path) if restored else None,
        need_teacher=objective.needs_teacher,
        need_ref=need_ref,
    )
    note(
        f"loaded in {duration(time.perf_counter() - t0)}: {len(setup.train)} training {stage.items}, "
        f"{len(setup.val)} validation prompts",
        enabled=chatty,
    )
    stage.check(cfg, setup)
    if cfg.student.lora:
        trainable, total = lora.trainable_count(setup.student.model)
        note(
            f"LoRA adapter (r={cfg.student.lora.r}): {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / total:.2f}%)",
            enabled=chatty,
        )
    setup.dist = dist
    if dist.active:
        frozen = [m.model for m in (setup.teacher, setup.ref) if m is not None and m.model is not None]
        if dist.is_main:
            console.print(
                memory_plan(
                    setup.student.model,
                    frozen,
                    world=dist.world,
                    micro_batch=cfg.train.micro_batch,
                    seq_len=cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                    chunk_size=cfg.loss.chunk_size,
                    shard_frozen=cfg.train.shard_frozen,
                    gathered_sampling=cfg.sampling.backend != "vllm",
                    checkpointing=cfg.train.gradient_checkpointing,
                ),
                highlight=False,
            )
        dist.wrap(setup.student.model)
        if cfg.train.shard_frozen:
            for model in frozen:
                dist.wrap_frozen(model)
    if dist.is_main:
        check_free_space(run_dir, checkpoint_bytes(setup.student.model), "a checkpoint")
        write_config(run_dir, cfg)
    optimizer = make_adamw(
        [p for p in setup.student.model.parameters() if p.requires_grad],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
    )
    start = 0
    if restored:
        dist.load_optimizer(setup.student.model, optimizer, restored.optimizer_state)
        set_rng_state(restored.rng)
        start = restored.step
    else:
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
    return _loop(
        cfg,
        stage,
        objective,
        setup,
        optimizer,
        run_dir,
        start=start,
        restored_state=restored.state if restored else {},
        stop=stop,
    )


def train_lr(cfg: Config, step: int) -> float:
    """The learning rate of `step` under train.lr, train.lr_schedule, train.warmup_steps, train.min_lr_ratio."""
    t = cfg.train
    return lr_at_step(
        t.lr, step=step, total=t.steps, schedule=t.lr_schedule, warmup=t.warmup_steps, floor=t.min_lr_ratio
    )


def update(cfg: Config, setup: Setup, optimizer, rollouts, golds, objective: Objective, prompts, targets):
    """train.epochs_per_batch optimizer passes over one batch (pi_old frozen before the first when several)."""
    model = setup.student.model
    tcfg = cfg.train
    if tcfg.epochs_per_batch > 1 and rollouts:  # freeze pi_old before the first pass over this batch
        with setup.dist.unsharded(model):
            old = score_targets(
                model,
                prompts,
                targets,
                pad_id=pad_id_of(setup.student.tokenizer),
                micro_batch=tcfg.micro_batch,
                chunk_size=objective.chunk_size,
                vocab_size=setup.vocab_size,
            )
        for r, o in zip(rollouts, old):
            r.old_lp = o
    model.train()
    metrics: dict[str, Any] = {}
    teacher_s = 0.0
    for _ in range(tcfg.epochs_per_batch):
        metrics = optimizer_step(
            model,
            optimizer,
            rollouts,
            golds,
            objective,
            ref=setup.ref.model if setup.ref else None,
            teacher=setup.teacher.model if setup.teacher else None,
            pad_id=pad_id_of(setup.student.tokenizer),
            micro_batch=tcfg.micro_batch,
            grad_clip=tcfg.grad_clip,
            dist=setup.dist,
        )
        teacher_s += metrics.pop("time/teacher_s", 0.0)
        if metrics["optim/skipped"]:  # a NaN step touches neither the weights nor Adam's moments
            break
    metrics["optim/lr"] = optimizer.param_groups[0]["lr"]
    metrics["time/teacher_s"] = teacher_s
    return metrics


def guard_from(cfg: Config) -> CollapseGuard:
    return CollapseGuard(**cfg.diagnose.thresholds())


def stop_for_collapse(run_dir: Path, verdict) -> CollapseStop:
    return CollapseStop(
        f"collapse detected (onset step {verdict.onset_step}); checkpoint saved. "
        f"Look at it with: stableopd diagnose {run_dir}"
    )


def stop_for_nonfinite(k: int) -> TrainingStopped:
    return TrainingStopped(
        f"{k} consecutive steps had a non-finite loss or gradient; stopped, keeping the last "
        "good checkpoint. Lower train.lr or check the data"
    )


def build_step_backend(cfg: Config, setup: Setup):
    return sampler(cfg, setup.student, setup.stop_ids)


def _loop(
    cfg: Config,
    stage: Stage,
    objective: Objective,
    setup: Setup,
    optimizer,
    run_dir: Path,
    *,
    start: int,
    restored_state: dict[str, Any],
    stop: GracefulStop,
) -> int:
    """Steps start+1 .. train.steps; returns the exit code (0), or raises a stop."""
    dist = setup.dist
    stop.arm()  # from here a first signal lets the loop finish a step and save it
    log = (
        MetricsLog.open(run_dir / "metrics.jsonl", keep_until=start if start else None)
        if dist.is_main
        else MetricsLog.reader(run_dir / "metrics.jsonl", keep_until=start if start else None)
    )
    guard = guard_from(cfg)
    for row in log.rows:
        if "rollout/trunc_rate" in row:
            guard.update(row["step"], row)
    with open_trackers(cfg, run_dir, start, enabled=dist.is_main) as trackers:
        log.mirrors.append(trackers.log)
        return _steps(
            cfg,
            stage,
            objective,
            setup,
            optimizer,
            run_dir,
            start=start,
            restored_state=restored_state,
            stop=stop,
            log=log,
            guard=guard,
            trackers=trackers,
        )


def open_trackers(cfg: Config, run_dir: Path, start: int, *, enabled: bool) -> Trackers:
    """The experiment trackers of logging.report_to (stableopd/engine/trackers.py), on the writing rank only."""
    lg = cfg.logging
    if not (enabled and lg.report_to):
        return Trackers.none()
    return Trackers.open(
        lg.report_to,
        run_dir=run_dir,
        config=cfg.model_dump(mode="json"),
        project=lg.project,
        run_name=lg.run_name,
        start=start,
        table_limit=lg.table_rows,
    )


def _steps(
    cfg: Config,
    stage: Stage,
    objective: Objective,
    setup: Setup,
    optimizer,
    run_dir: Path,
    *,
    start: int,
    restored_state: dict[str, Any],
    stop: GracefulStop,
    log: MetricsLog,
    guard: CollapseGuard,
    trackers: Trackers,
) -> int:
    from stableopd.progress import step_display

    tcfg = cfg.train
    dist = setup.dist
    backend = dist.sampler(build_step_backend(cfg, setup), setup.student.model)
    objective = bind(objective, cfg, setup.vocab_size, setup.pair)
    bad = int(restored_state.get("consecutive_bad", 0))
    skipped = int(restored_state.get("skipped_total", 0))
    chatty = cfg.logging.progress and dist.is_main
    if start == 0 and tcfg.eval_every and tcfg.eval_at_start:
        note(
            f"validating on {len(setup.val)} prompts before training ...", enabled=chatty and bool(setup.val)
        )
        first = _validate(cfg, setup, backend, 0, run_dir)
        log.write({"step": 0, **first})
        if first and dist.is_main and cfg.logging.progress:
            acc = first.get("val/accuracy")
            console.print(
                f"step     0 before training: val_acc {'-' if acc is None else f'{acc:.3g}'} "
                f"val_len {first.get('val/length_mean', 0):.1f}",
                highlight=False,
            )

    def save(step: int) -> None:
        model_state, optim_state = (
            dist.full_states(setup.student.model, optimizer) if dist.active else (None, None)
        )
        if dist.is_main:
            save_checkpoint(
                run_dir,
                step,
                model=setup.student.model,
                tokenizer=setup.student.tokenizer,
                optimizer=optimizer,
                state={
                    "data_position": step * tcfg.prompts_per_step,
                    "consecutive_bad": bad,
                    "skipped_total": skipped,
                },
                keep_last=tcfg.keep_last,
                model_state=model_state,
                optimizer_state=optim_state,
            )

    t_loop = time.perf_counter()
    clock = StepClock()
    with step_display(tcfg.steps, start, enabled=cfg.logging.progress and dist.is_main) as show:
        for step in range(start + 1, tcfg.steps + 1):
            metrics, records = stage.step(cfg, setup, backend, optimizer, step, objective=objective)
            t_sync = time.perf_counter()
            backend.sync_weights(setup.student.model)
            metrics["time/sync_s"] = float(dist.all_max([time.perf_counter() - t_sync])[0])
            bad = bad + 1 if metrics["optim/skipped"] else 0
            skipped += metrics["optim/skipped"]
            metrics["optim/skipped_total"] = skipped
            if tcfg.eval_every and step % tcfg.eval_every == 0:
                metrics.update(_validate(cfg, setup, backend, step, run_dir))
            verdict = guard.update(step, metrics) if "rollout/trunc_rate" in metrics else guard.verdict
            metrics["guard/verdict"] = verdict.verdict
            metrics["guard/onset_step"] = verdict.onset_step
            if records and tcfg.rollouts_every and step % tcfg.rollouts_every == 0 and dist.is_main:
                write_jsonl_atomic(run_dir / "rollouts" / f"step_{step:06d}.jsonl", records)
                trackers.table(step, records)
            clock.close(metrics)
            log.write({"step": step, **metrics})
            if dist.is_main:
                show(step, metrics, verdict)
            stage.after_step(cfg, metrics)
            if bad >= tcfg.max_bad_steps:
                raise stop_for_nonfinite(bad)
            collapse = verdict.verdict == "collapse" and tcfg.stop_on_collapse
            signum = agreed_signal(stop, dist) if step < tcfg.steps else None
            if step % tcfg.save_every == 0 or step == tcfg.steps or collapse or signum:
                t_save = time.perf_counter()
                save(step)
                clock.add_save(time.perf_counter() - t_save)
            if collapse:
                raise stop_for_collapse(run_dir, verdict)
            if signum:
                raise Stopped(signum, step)
    if dist.is_main:
        print_summary(
            cfg, log.rows, first_step=start + 1, wall_s=time.perf_counter() - t_loop, run_dir=run_dir
        )
        console.print(stage.closing(run_dir, cfg), highlight=False, soft_wrap=True)  # paths stay whole
    return 0


def agreed_signal(stop: GracefulStop, dist) -> int | None:
    """The stop signal if any rank received one (every rank stops after the same step)."""
    signum = stop.signum or 0
    if dist is not None and dist.active:
        signum = int(dist.all_max([float(signum)])[0])
    return signum or None


def print_summary(
    cfg: Config, rows: list[dict[str, Any]], *, first_step: int, wall_s: float, run_dir: Path
) -> None:
    """The end-of-run lines, then a warning when the rollouts' truncation or repetition stayed high."""
    from stableopd.diagnostics.analysis import level_warnings

    kept = [p.name for p in list_checkpoints(run_dir)]
    for line in run_summary(rows, first_step=first_step, wall_s=wall_s, checkpoints=kept):
        console.print(line, highlight=False, soft_wrap=True)
    if rows and rows[-1].get("guard/verdict", "healthy") == "healthy":
        keys = ("rollout/trunc_rate", "rollout/rep_rate")
        series = {k: {r["step"]: r[k] for r in rows if isinstance(r.get(k), (int, float))} for k in keys}
        for w in level_warnings(series, cfg.diagnose):
            console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)


def _validate(cfg: Config, setup: Setup, backend, step: int, run_dir: Path) -> dict[str, Any]:
    # each rank samples its share of the validation set on the gathered student; rank 0 writes the records
    with setup.dist.unsharded(setup.student.model):
        out = validate(cfg, setup, backend, step, run_dir, write=setup.dist.is_main)
    if "time/val_s" in out:  # the slowest rank's, like the other parts of the step
        out["time/val_s"] = float(setup.dist.all_max([out["time/val_s"]])[0])
    return out
