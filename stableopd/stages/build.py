"""What the stages build from the config, in one place: a model from its spec, the sampler, the sampling
parameters of training and of evaluation, the prompts' token ids."""

from __future__ import annotations

from typing import Any

from stableopd.backends.base import Backend, build_backend
from stableopd.config import Config, ModelSpec, TeacherSpec
from stableopd.data.sources import encode_prompts
from stableopd.models.loading import Loaded, load_model
from stableopd.types import Example, SamplingParams


def load_spec(
    spec: ModelSpec, *, name: str | None = None, device: str | None = None, tokenizer: Any = None
) -> Loaded:
    """The model of a `student` or `teacher` section (`name` instead of spec.name: a checkpoint, a run's model)."""
    role = "teacher" if isinstance(spec, TeacherSpec) else "student"
    return load_model(
        name or spec.name,
        dtype=spec.dtype,
        device=device or spec.device,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        tokenizer=tokenizer,
        config_overrides=spec.config_overrides,
        overrides_key=f"{role}.config_overrides",
    )


def sampler(cfg: Config, loaded: Loaded, stop_ids: list[int]) -> Backend:
    """The `sampling.backend` sampler on a loaded model."""
    return build_backend(
        cfg.sampling.backend,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        model_path=loaded.path,
        stop_ids=stop_ids,
        options=cfg.sampling.options,
    )


def train_sampling(cfg: Config, step: int | None = None, banned: tuple[int, ...] = ()) -> SamplingParams:
    """The `sampling` section's parameters; a training step's seed is a function of the step."""
    s = cfg.sampling
    return SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed if step is None else s.seed * 1_000_003 + step,
        banned_token_ids=banned,
    )


def eval_sampling(cfg: Config, *, seed: int, banned: tuple[int, ...] = ()) -> SamplingParams:
    """The `eval` section's parameters (validation and `stableopd eval`); the budget defaults to training's."""
    ev = cfg.eval
    return SamplingParams(
        n=ev.n,
        temperature=ev.temperature,
        top_p=ev.top_p,
        top_k=0,
        max_new_tokens=ev.max_new_tokens or cfg.sampling.max_new_tokens,
        seed=seed,
        banned_token_ids=banned,
    )


def encode(cfg: Config, tokenizer, examples: list[Example]) -> list[list[int]]:
    """The prompts' token ids under the data section's chat template, system prompt and length limit."""
    d = cfg.data
    return encode_prompts(
        tokenizer,
        examples,
        chat_template=d.chat_template,
        system_prompt=d.system_prompt,
        max_tokens=d.max_prompt_tokens,
    )


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's, else its end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
