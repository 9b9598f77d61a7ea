"""`--dry-run` for `distill` and `sft`: every check that needs no model weights, then the plan, exit 0.

It resolves the config, runs the cross-field rules (config.check_rules) and the process-count rules
(distributed.check_launch), checks the run directory, the trackers and peft, reads local data files, and
prints what the run would do: the objective's terms, each model and where it comes from, the processes,
backend and tokens per step, and the memory per rank where a model's config is on this machine (the model
is built on the meta device: no weights are read or allocated). Nothing is built, downloaded or written.
What the machine still lacks for the real run (vLLM, a model not yet cached) is listed, not an error, so
a config can be checked on a laptop before it goes to a GPU node.

    stableopd distill -c examples/paper-qwen-math-1.5b.yaml --nproc 8 --dry-run
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stableopd.config import Config
from stableopd.errors import UserError


@dataclass
class ModelInfo:
    role: str
    name: str
    source: str  # where the weights come from, in words
    config: Any = None  # the transformers config with config_overrides applied, when available here
    missing: str | None = None  # what the real run must fetch or build first


def objective_terms(cfg: Config, command: str) -> str:
    lo = cfg.loss
    if command == "sft":
        return "SFT on golden solutions"
    if lo.objective == "jsd":
        terms = [f"generalised JSD to the teacher (beta={lo.jsd_beta:g})"]
    else:
        terms = [f"OPD policy gradient (advantage {lo.advantage})"]
    if lo.objective != "opd" and lo.ref_kl_coef > 0:
        terms.append(f"{lo.ref_kl_coef:g} x KL to the initial student")
    if lo.objective == "stableopd" and lo.gold_coef > 0:
        terms.append(f"{lo.gold_coef:g} x SFT on golden solutions")
    return f"{lo.objective}: " + " + ".join(terms)


def locate(role: str, spec, *, config_key: str) -> ModelInfo:
    """Where a model's weights come from and, when its config is on this machine, the config."""
    from stableopd.models.loading import ALIASES, BUILTINS, built_dir, overridden_config, resolve_model_path
    from stableopd.models.toy import shipped_weights

    name = spec.name
    path: str | None
    if name in BUILTINS or name.endswith(".gguf"):
        built = built_dir(name)
        path = str(built) if (built / "config.json").is_file() else None
        kind = "built-in" if name in BUILTINS else "GGUF file"
        first_use = "installed on first use" if shipped_weights(name) else "built on first use"
        info = ModelInfo(role, name, f"{kind}, cached at {built}" if path else f"{kind}, {first_use}")
        if path is None:
            info.missing = f"{name} ({first_use})"
            return info
    else:
        path = resolve_model_path(name)  # local directories are checked; hub ids come back as they are
        hub = not Path(path).exists()
        info = ModelInfo(role, name, f"Hugging Face hub '{path}'" if hub else f"local directory {path}")
        if name in ALIASES:
            info.source += f" (alias {name})"
    from stableopd.engine.lora import adapter_base, is_adapter_dir

    if is_adapter_dir(path):
        info.source += f", a LoRA adapter on {adapter_base(path)}"
        path = adapter_base(path)
    try:
        info.config, _ = overridden_config(
            path,
            spec.config_overrides,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            key=config_key,
        )
    except UserError as exc:
        if "config_overrides" in str(exc) or Path(path).exists():
            raise
        info.missing = f"{path} (not in the local Hugging Face cache: downloaded at run time)"
    return info


def meta_model(info: ModelInfo, dtype: str, device: str, *, trainable: bool, lora=None):
    """The model built on the meta device from its config: shapes and dtypes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    from stableopd.models.loading import resolve_dtype

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(info.config, dtype=resolve_dtype(dtype, dev))
    model.requires_grad_(trainable and lora is None)
    if lora is not None:  # the adapter too: its target modules are checked and its parameters counted
        from stableopd.engine.lora import attach

        with torch.device("meta"):
            model = attach(model, lora, base_name=info.name)
    return model


def count(n: int) -> str:
    """1543714304 -> '1,543.7M'; counts under 100,000 as they are."""
    return f"{n / 1e6:,.1f}M" if n >= 100_000 else f"{n:,}"


def run_plan(cfg: Config, *, command: str, world: int, resume: bool, print_line) -> int:
    """Check what can be checked without weights and print the plan; exit code 0."""
    from stableopd.engine.checkpoint import list_checkpoints
    from stableopd.engine.distributed import check_launch, human_bytes, memory_plan
    from stableopd.engine.trackers import check_installed
    from stableopd.files import check_output_dir

    check_launch(world, cfg)  # the config's own rules ran when it loaded (config.check_rules)
    check_installed(cfg.logging.report_to)
    if cfg.student.lora:
        from stableopd.engine.lora import import_peft

        import_peft()
    run_dir = Path(cfg.out or f"runs/{command}")
    check_output_dir(run_dir, "run directory")
    done = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if resume and not done:
        raise UserError(f"--resume: run directory '{run_dir}' has no complete checkpoint to resume from")
    if not resume:
        from stableopd.stages.training import check_fresh

        check_fresh(run_dir)
    s, d, tr = cfg.sampling, cfg.data, cfg.train
    need_ref = command == "distill" and cfg.loss.objective != "opd" and cfg.loss.ref_kl_coef > 0
    models = [locate("student", cfg.student, config_key="student.config_overrides")]
    if command == "distill":
        models.append(locate("teacher", cfg.teacher, config_key="teacher.config_overrides"))
    lines = [
        f"plan: stableopd {command}, dry run (nothing loaded, built or written)",
        f"  objective     {objective_terms(cfg, command)}",
    ]
    for m in models:
        lines.append(f"  {m.role:<13} {m.name}: {m.source}")
        if m.role == "student" and cfg.student.config_overrides:
            lines.append(f"  {'':<13} config_overrides {cfg.student.config_overrides}")
    if need_ref:
        ref = "the student with its LoRA adapter off" if cfg.student.lora else "a frozen copy of the student"
        lines.append(f"  {'reference':<13} {ref}")
    lines.append(f"  {'data':<13} {describe_data(cfg, command)}")
    lines.append(
        f"  {'processes':<13} {world}"
        + (
            f" (global batch {tr.prompts_per_step} prompts, {tr.prompts_per_step // world} per rank)"
            if world > 1
            else ""
        )
    )
    if command == "distill":
        engine = f", teacher scored by {cfg.teacher.engine}"
        lines.append(
            f"  {'sampling':<13} {s.backend} backend{engine}; {tr.prompts_per_step} prompts x {s.n} "
            f"rollouts of up to {s.max_new_tokens:,} new tokens = up to "
            f"{tr.prompts_per_step * s.n * s.max_new_tokens:,} sampled tokens a step"
            + (f" ({tr.prompts_per_step * s.n * s.max_new_tokens // world:,} per rank)" if world > 1 else "")
        )
    budget = d.max_prompt_tokens + max(s.max_new_tokens, cfg.eval.max_new_tokens or 0)
    for m in models:
        ctx = getattr(m.config, "max_position_embeddings", None)
        if ctx is not None and ctx < budget:
            lines.append(
                f"  warning: the {m.role}'s context is {ctx:,} tokens; a prompt longer than "
                f"{ctx - budget + d.max_prompt_tokens:,} tokens would not fit its new tokens (the run "
                f"stops before any compute if one does; see {m.role}.config_overrides)"
            )
    student = models[0]
    if student.config is not None:
        frozen_infos = [
            m
            for m in models[1:]
            if m.config is not None and not (m.role == "teacher" and cfg.teacher.engine == "vllm")
        ]
        uncounted = [m for m in models[1:] if m.config is None and cfg.teacher.engine != "vllm"]
        try:
            smodel = meta_model(
                student, cfg.student.dtype, cfg.student.device, trainable=True, lora=cfg.student.lora
            )
            frozen = [
                meta_model(m, cfg.teacher.dtype, cfg.teacher.device, trainable=False) for m in frozen_infos
            ]
            if need_ref and not cfg.student.lora:
                frozen.append(meta_model(student, cfg.student.dtype, cfg.student.device, trainable=False))
            lines.append(
                "  "
                + memory_plan(
                    smodel,
                    frozen,
                    world=world,
                    micro_batch=tr.micro_batch,
                    seq_len=budget,
                    chunk_size=cfg.loss.chunk_size,
                    shard_frozen=tr.shard_frozen,
                    gathered_sampling=s.backend != "vllm",
                    checkpointing=tr.gradient_checkpointing,
                ).replace("\n", "\n  ")
            )
            if uncounted:
                lines.append(
                    f"    (the {uncounted[0].role} is not counted: its config is not on this machine)"
                )
            params = list(smodel.parameters())
            ckpt = sum(p.numel() * (p.element_size() + (8 if p.requires_grad else 0)) for p in params)
            lines.append(
                f"  {'student size':<13} {count(sum(p.numel() for p in params))} parameters "
                f"({count(sum(p.numel() for p in params if p.requires_grad))} trained); a "
                f"checkpoint is about {human_bytes(ckpt)}"
            )
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            lines.append(f"  memory plan not available: the model cannot be built from its config ({exc})")
    else:
        lines.append("  memory plan not available: the student's config is not on this machine")
    lacking = [m.missing for m in models if m.missing]
    if s.backend == "vllm" or cfg.teacher.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            lacking.append("vllm (pip install 'stableopd[vllm]', on a CUDA machine)")
    if not (d.source.startswith("builtin:") or Path(d.source).expanduser().exists()):
        lacking.append(f"dataset {d.source} (loaded from the Hugging Face hub or its cache at run time)")
    state = f"resumes from {done[-1].name}" if resume else "starts a new run"
    lines.append(f"  {'run dir':<13} {run_dir} ({state})")
    lines.append(
        "ready to launch" if not lacking else "ready to launch once this machine has: " + "; ".join(lacking)
    )
    for line in lines:
        print_line(line)
    return 0


def describe_data(cfg: Config, command: str) -> str:
    """Local files and built-ins are read and counted (field names checked); hub datasets are named."""
    from stableopd.data.sources import examples_for

    d = cfg.data
    local = d.source.startswith("builtin:") or Path(d.source).expanduser().exists()
    if not local:
        return f"'{d.source}' (split {d.split}), from the Hugging Face hub"
    examples = examples_for(d, limit=d.limit)
    golden = sum(e.solution is not None for e in examples)
    if command == "sft" and not golden:
        from stableopd.stages.sft import no_solutions

        raise no_solutions(d)
    return f"'{d.source}': {len(examples):,} training examples, {golden:,} with a golden solution"
