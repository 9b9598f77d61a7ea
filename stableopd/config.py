"""One pydantic config shared by every command, loaded from YAML and `-s key=value` overrides.

Precedence, highest first: command-line flags (`--student`, `--model`, ...), `-s` overrides, the YAML
file given with `-c`, then the defaults below. Every section forbids unknown keys, so a typo is an
error that names the key and lists the valid ones. `dump_config` writes the resolved config that
`load_config` reads back to an equal object; every run directory keeps one.

    stableopd distill -c examples/smoke.yaml -s loss.ref_kl_coef=0.02
"""

from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stableopd.errors import UserError
from stableopd.files import read_text

MAX_INT = 2**31 - 1  # every count and size: larger values overflow tensors and index types downstream
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS = 1 << 20
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything larger is the wrong file
MIN_TEMPERATURE = 1e-3  # below it logits / T overflow in low precision: use 0 (greedy) instead


class Section(BaseModel):
    # allow_inf_nan=False: every float key must be finite ("nan", ".inf" are errors that name the key)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_temperature(v: float) -> float:
    if 0 < v < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return v


class ModelSpec(Section):
    """A model: alias (`tiny`, `qwen-1.5b`, ...), Hugging Face id, local directory or `.gguf` file."""

    name: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto, cpu, mps, cuda, cuda:N (or xpu / npu, :N)
    revision: str | None = None
    trust_remote_code: bool = False
    # set on the model's config before the weights load, saved with every checkpoint and given to vLLM
    # engines, e.g. {rope_theta: 300000, max_position_embeddings: 32768} to extend a context
    config_overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu|npu)(:\d+)?", v):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N (xpu, npu likewise)")
        return v


class DataConfig(Section):
    """Prompts: a local JSONL/Parquet file, `builtin:arith`, or a Hugging Face dataset name."""

    source: str = "builtin:arith"
    split: str = "train"
    val_source: str | None = None  # None: `source` with `val_split` (builtin:arith uses a held-out seed)
    val_split: str = "validation"
    id_field: str = "id"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    solution_field: str = "solution"  # a list field gives its first non-empty string (or see the next key)
    # a list of booleans parallel to a list solution_field: the golden solution is the first item flagged
    # true; training examples with none are dropped (the paper trains only on problems with a verified trace)
    solution_correct_field: str | None = None
    # drop training examples whose golden solution is over this many tokens (the student's tokenizer, the
    # stop token the gold target ends with not counted); validation examples are never dropped
    max_solution_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    limit: int | None = Field(default=None, ge=1, le=MAX_INT)  # applied before the two rules above drop any
    val_limit: int | None = Field(default=64, ge=1, le=MAX_INT)
    shuffle: bool = True
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = Field(default=1024, ge=1, le=MAX_NEW_TOKENS)
    max_file_mb: int = Field(default=4096, ge=1, le=1 << 30)  # a local data file is read whole: refuse larger
    max_line_mb: int = Field(default=64, ge=1, le=1 << 20)  # a longer JSONL line is an error


class SamplingConfig(Section):
    """How rollouts are drawn. `options` go to the backend, which validates them itself."""

    backend: str = "hf"
    n: int = Field(default=4, ge=1, le=MAX_INT)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=MAX_INT)  # 0 = off
    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    options: dict[str, Any] = Field(default_factory=dict)

    _temperature = field_validator("temperature")(classmethod(lambda cls, v: _check_temperature(v)))

    # stop when sampler and trainer log-probs of the sampled tokens differ by more than this (mean, nats):
    # a weight sync that did not take; checked at temperature 1 with no top-p/top-k; 0 = never
    max_sync_mismatch: float = Field(default=0.05, ge=0.0)


class LossConfig(Section):
    """The distillation objective. See stableopd/core/losses.py for the formulas."""

    objective: Literal["opd", "stableopd", "jsd"] = "stableopd"
    advantage: Literal["log_ratio", "power", "clip", "log_compress"] = "log_ratio"
    power_alpha: float = Field(default=5.0, gt=0.0, le=100.0)
    adv_clip: float = Field(default=1.0, gt=0.0, le=1e6)
    clip_eps: float = Field(default=0.2, gt=0.0, le=10.0)
    aggregation: Literal["seq_mean", "token_mean"] = "seq_mean"
    ref_kl_coef: float = Field(default=0.01, ge=0.0, le=1e6)
    gold_coef: float = Field(default=0.1, ge=0.0, le=1e6)
    jsd_beta: float = Field(default=0.5, ge=0.0, le=1.0)  # TRL's convention: 0 forward KL, 1 reverse KL
    # discount of the OPD advantage's reward-to-go: 0 = per-token advantages (the paper), 1 = the sum of
    # the log-ratios from each token to the end (the sequence-level reverse-KL gradient)
    reward_to_go: float = Field(default=0.0, ge=0.0, le=1.0)
    teacher_temperature: float = Field(default=1.0, ge=MIN_TEMPERATURE, le=100.0)
    chunk_size: int = Field(default=1024, ge=1, le=MAX_INT)

    @model_validator(mode="after")
    def _keys_fit_objective(self) -> LossConfig:
        if self.objective == "jsd" and self.reward_to_go > 0:
            raise ValueError(
                "loss.reward_to_go shapes the OPD advantage, and loss.objective=jsd has none; "
                "use objective opd or stableopd, or set loss.reward_to_go=0"
            )
        return self


class TrainConfig(Section):
    steps: int = Field(default=100, ge=1, le=MAX_INT)
    prompts_per_step: int = Field(default=8, ge=1, le=MAX_INT)
    lr: float = Field(default=1e-6, gt=0.0, le=10.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = (
        "constant"  # after the warmup (stableopd/core/schedule.py)
    )
    warmup_steps: int = Field(default=0, ge=0, le=MAX_INT)  # linear warmup from lr / warmup_steps up to lr
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)  # linear/cosine end at min_lr_ratio * lr
    weight_decay: float = Field(default=0.0, ge=0.0, le=100.0)
    micro_batch: int = Field(default=8, ge=1, le=MAX_INT)  # sequences per forward/backward
    epochs_per_batch: int = Field(default=1, ge=1, le=MAX_INT)
    grad_clip: float = Field(default=1.0, ge=0.0)  # 0 = off
    gradient_checkpointing: bool = False  # recompute decoder activations in backward: less memory, more time
    save_every: int = Field(default=50, ge=1, le=MAX_INT)
    keep_last: int = Field(default=3, ge=1, le=MAX_INT)
    eval_every: int = Field(default=10, ge=0, le=MAX_INT)  # 0 = no validation
    eval_at_start: bool = True  # validate once before the first update (logged as step 0)
    rollouts_every: int = Field(
        default=1, ge=0, le=MAX_INT
    )  # write rollouts/step_N.jsonl every k steps; 0 = never
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    stop_on_collapse: bool = False
    max_bad_steps: int = Field(default=3, ge=1, le=MAX_INT)  # consecutive non-finite steps before stopping
    # multi-process: a collective waiting longer raises
    dist_timeout_s: float = Field(default=600.0, gt=0.0, le=7 * 86400.0)
    shard_frozen: bool = (
        False  # multi-process: FSDP-shard teacher and reference too (default: a full copy per rank)
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) is longer than train.steps ({self.steps})"
            )
        if self.lr_schedule == "constant" and self.min_lr_ratio > 0:
            raise ValueError(
                "train.min_lr_ratio only applies to train.lr_schedule linear or cosine, not constant"
            )
        return self


class EvalConfig(Section):
    """`stableopd eval` (stableopd/stages/evaluate.py). Unset keys take the preset's value when `preset` is set."""

    n: int = Field(default=1, ge=1, le=MAX_INT)  # samples per problem: accuracy is avg@n
    temperature: float = Field(default=0.6, ge=0.0, le=100.0)  # 0 = greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)  # None: sampling.max_new_tokens
    checker: str = (
        "auto"  # a name registered in stableopd/eval/answers.py: auto, math, numeric, or a plugin's
    )
    pass_k: list[int] = Field(default_factory=lambda: [1])  # unbiased pass@k for each k (k <= n)
    preset: str | None = None  # math500, aime24, aime25, amc, minerva, olympiadbench (eval_presets.py)
    response_field: str = "response"  # text field of `eval --responses FILE.jsonl` lines

    _temperature = field_validator("temperature")(classmethod(lambda cls, v: _check_temperature(v)))

    @field_validator("pass_k")
    @classmethod
    def _positive_k(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 or k > MAX_INT for k in v):
            raise ValueError("must be a non-empty list of positive integers, e.g. [1, 4]")
        return v


class DiagnoseConfig(Section):
    """Repetition rules and the collapse/inflation detector (rules in stableopd/core/repetition.py, diagnostics.py)."""

    rep_tail_chars: int = Field(default=10_000, ge=1, le=MAX_INT)  # L; short generations need a smaller L
    rep_ratio: float = Field(default=10.0, gt=0.0, le=1e6)  # tau
    rep_token_ngram: int = Field(
        default=16, ge=1, le=MAX_INT
    )  # a token is repetitive inside a repeated n-token window
    text_field: str = "response"
    finish_field: str = "finish_reason"
    truncated_field: str = "truncated"
    step_field: str = "step"
    chunk_size: int = Field(default=0, ge=0, le=MAX_INT)  # no step field: 0 = one step, k = k records a step
    collapse_trunc: float = Field(default=0.95, ge=0.0, le=1.0)
    collapse_rep_jump: float = Field(default=0.2, ge=0.0, le=1.0)
    patience: int = Field(default=3, ge=1, le=MAX_INT)  # steps an excursion must last before it counts
    max_gap: int = Field(default=1, ge=0, le=MAX_INT)  # failing steps tolerated inside a collapse excursion
    inflation_window: int = Field(default=20, ge=3, le=MAX_INT)
    inflation_min_growth: float = Field(default=0.3, ge=0.0, le=1e6)  # relative growth of the length median
    inflation_trunc_rise: float = Field(default=0.15, ge=0.0, le=1.0)  # absolute rise of the trunc median
    # a warning (not a verdict) when the median over the last inflation_window steps is at least this high,
    # even if it never changed: a budget too small from the first step, or a run that began collapsed
    high_trunc: float = Field(default=0.6, ge=0.0, le=1.0)
    high_rep: float = Field(default=0.5, ge=0.0, le=1.0)
    examples: int = Field(default=5, ge=0, le=MAX_INT)  # worst responses shown by diagnose
    example_files: int = Field(
        default=3, ge=0, le=MAX_INT
    )  # last rollout files read for examples when metrics exist
    max_line_mb: int = Field(
        default=64, ge=1, le=1 << 20
    )  # a longer JSONL line is an error (files are streamed)

    def thresholds(self) -> dict[str, Any]:
        """Keyword arguments of `diagnostics.detect` and `diagnostics.CollapseGuard`."""
        keys = ("collapse_trunc", "collapse_rep_jump", "patience", "max_gap")
        keys += ("inflation_window", "inflation_min_growth", "inflation_trunc_rise")
        return {k: getattr(self, k) for k in keys}


class LoggingConfig(Section):
    """Progress output, and experiment trackers fed the same rows as metrics.jsonl (stableopd/engine/trackers.py)."""

    progress: bool = True
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(default_factory=list)
    project: str = Field(default="stableopd", min_length=1)  # wandb/trackio project, MLflow experiment
    run_name: str | None = None  # the tracker's run name; None: the run directory's name
    table_rows: int = Field(
        default=8, ge=0, le=10_000
    )  # rollouts per tracker table (every train.rollouts_every)

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names a tracker twice")
        return v


class LoraSpec(Section):
    """A LoRA adapter on the student (peft): only the adapter trains, and the reference for the KL term is the
    same model with the adapter switched off (stableopd/engine/lora.py)."""

    r: int = Field(default=16, ge=1, le=1 << 16)
    alpha: float = Field(default=32.0, gt=0.0, le=1e6)  # the update is scaled by alpha / r
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # module names (suffixes) to adapt, or "all-linear": every linear layer but the output head
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _not_head(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError('must name at least one module, or be "all-linear"')
            if bad := [m for m in v if m in ("lm_head", "embed_tokens", "wte", "embed_out")]:
                raise ValueError(
                    f"{bad[0]} is the embedding or output head, which the fused loss kernels read "
                    "as a plain weight; adapt the decoder's linear layers"
                )
        return v


class StudentSpec(ModelSpec):
    """The student: a ModelSpec, optionally trained through a LoRA adapter."""

    lora: LoraSpec | None = None  # None: full fine-tuning


class TeacherSpec(ModelSpec):
    """The teacher: a ModelSpec plus how it reads the student's tokens (stableopd/models/pairing.py)."""

    name: str = "tiny-teacher"
    engine: Literal["hf", "vllm"] = "hf"  # "vllm" scores with vLLM prompt_logprobs
    engine_options: dict[str, Any] = Field(default_factory=dict)  # vLLM engine options when engine=vllm
    # the token the teacher is scored on where the student stops; None: its chat template's end of turn
    # (data.chat_template) or its EOS
    end_token: str | None = None
    # added-token ids that name different tokens in the two tokenizers: "error" refuses the pair, "suppress"
    # keeps the student's sampler from producing them
    mismatched_tokens: Literal["error", "suppress"] = "error"


class Config(Section):
    student: StudentSpec = Field(default_factory=StudentSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    diagnose: DiagnoseConfig = Field(default_factory=DiagnoseConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    out: str | None = None  # run directory (distill, sft), JSONL file (rollout), folder (eval)

    @field_validator("out")
    @classmethod
    def _non_empty_out(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a path, not an empty string")
        return v


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise UserError(f"bad override key '{dotted}': use a dotted path such as loss.ref_kl_coef")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"bad override '{dotted}': '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`loss.ref_kl_coef=0.02` -> ("loss.ref_kl_coef", 0.02); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"bad override '{text}': expected key=value, e.g. -s train.steps=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, str) and _is_text_field(key):
        value = raw  # a text field takes the text as typed: "Answer: N" is not a mapping, "2024" not an int
    return key, value


def _is_text_field(dotted: str) -> bool:
    """True when `dotted` names a `str` or `str | None` field of Config."""
    model: Any = Config
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
    field = model.model_fields.get(leaf)
    ann = field.annotation if field else None
    return ann is str or (get_origin(ann) in (Union, UnionType) and set(get_args(ann)) == {str, type(None)})


# keys a user may reasonably write that live elsewhere: where to put them instead
MOVED_KEYS = {
    "student.engine": "the student samples through sampling.backend (hf, vllm or a plugin); "
    "teacher.engine chooses how the teacher scores",
    "student.engine_options": "vLLM sampling options go in sampling.options; teacher.engine_options configures "
    "the teacher's vLLM engine",
    "logging.tensorboard": "trackers are listed in logging.report_to, e.g. logging.report_to=[tensorboard]",
    "teacher.lora": "only the student trains; a LoRA adapter goes in student.lora",
    "train.dtype": "precision is set per model: student.dtype and teacher.dtype (the reference is the student's)",
}


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" and loc in MOVED_KEYS:
            parts.append(f"config key '{loc}' does not exist: {MOVED_KEYS[loc]}")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{loc}'{_valid_keys_hint(e['loc'])}")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a rule over a section's keys
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(
                f"config key '{loc}': {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
            )
    return "; ".join(parts)


def _valid_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return "; valid keys here: " + ", ".join(model.model_fields)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    text = read_text(p, "config file", max_bytes=MAX_CONFIG_BYTES)
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"config file '{p}' is nested too deeply to be a config") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"config file '{p}' must hold a mapping of sections, not {type(tree).__name__}")
    return tree


def merge_trees(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a copy; neither is changed)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < `base` < YAML file < `-s` overrides < flags (dotted keys, None = unset)."""
    tree = merge_trees(base or {}, read_yaml(path) if path else {})
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_validation_error(err)) from None
    check_rules(cfg)
    return cfg


VLLM_MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses more
VLLM_MEMORY_SHARE = 0.95  # two engines on one device: what their gpu_memory_utilization may add up to


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Validate the options of a built-in backend without importing its sampler (UserError naming the key);
    plugins validate their own when built."""
    if backend == "hf":
        from stableopd.backends.hf_options import parse_options
    elif backend == "vllm":
        from stableopd.backends.vllm import parse_options
    else:
        return
    parse_options(options)


def check_rules(cfg: Config) -> None:
    """Every rule that spans several keys, checked once when the config loads and before any model loads;
    each error names the keys involved. Rules that also depend on the process count are in
    `distributed.check_launch`."""
    check_options(cfg.sampling.backend, cfg.sampling.options)
    s, lo, t, d, ev = cfg.sampling, cfg.loss, cfg.teacher, cfg.data, cfg.eval
    if t.engine == "vllm":
        if lo.objective == "jsd":
            raise UserError(
                "loss.objective=jsd needs the teacher's full distribution, which teacher.engine=vllm "
                "does not give (only the sampled tokens' log-probs): use teacher.engine=hf"
            )
        if lo.teacher_temperature != 1.0:
            raise UserError(
                f"loss.teacher_temperature={lo.teacher_temperature} with teacher.engine=vllm: vLLM's "
                "prompt log-probs ignore temperature, so they would be silently wrong; use 1.0 or "
                "teacher.engine=hf"
            )
    elif t.engine_options:
        raise UserError(
            "teacher.engine_options configure a vLLM teacher engine, and teacher.engine=hf: set "
            "teacher.engine=vllm or remove teacher.engine_options"
        )
    budget = d.max_prompt_tokens + max(s.max_new_tokens, ev.max_new_tokens or 0)
    engines = []
    if s.backend == "vllm":
        from stableopd.backends.vllm import parse_options

        for key, temp in (("sampling.temperature", s.temperature), ("eval.temperature", ev.temperature)):
            if temp > VLLM_MAX_TEMPERATURE:
                raise UserError(
                    f"{key}={temp} with sampling.backend=vllm: vLLM accepts at most {VLLM_MAX_TEMPERATURE}"
                )
        engines.append(("sampling.options", parse_options(s.options)))
    if t.engine == "vllm":
        from stableopd.backends.vllm import parse_options

        engines.append(("teacher.engine_options", parse_options(t.engine_options, "teacher.engine_options")))
    for key, opts in engines:
        if opts.max_model_len is not None and opts.max_model_len < budget:
            raise UserError(
                f"{key}.max_model_len={opts.max_model_len} is shorter than data.max_prompt_tokens + "
                f"the longest of sampling.max_new_tokens and eval.max_new_tokens ({budget})"
            )
    if len(engines) == 2 and (total := sum(o.gpu_memory_utilization for _, o in engines)) > VLLM_MEMORY_SHARE:
        raise UserError(
            f"sampling.options.gpu_memory_utilization + teacher.engine_options.gpu_memory_utilization "
            f"= {total:g}: the two vLLM engines share the device; keep the sum at most "
            f"{VLLM_MEMORY_SHARE}"
        )
    for role, spec in (("student", cfg.student), ("teacher", t)):
        ctx = spec.config_overrides.get("max_position_embeddings")
        if ctx is not None and (not isinstance(ctx, int) or ctx < budget):
            raise UserError(
                f"{role}.config_overrides.max_position_embeddings={ctx!r} must be a whole number of "
                f"at least data.max_prompt_tokens + the longest of sampling.max_new_tokens and "
                f"eval.max_new_tokens ({budget})"
            )


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
