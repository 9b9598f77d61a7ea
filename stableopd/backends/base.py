"""The sampling contract and the backend registry.

A backend turns prompt token ids into samples: for each prompt, `n` responses, each with its token ids,
the log-prob of every sampled token under the distribution it was drawn from, and why it ended
("stop": a stop token was sampled, and it is the last id of `token_ids`; "length": the budget ran out).
Backends that hold their own copy of the weights (vLLM) implement `sync_weights`; the trainer calls it
after every optimizer step, and an `own_weights = True` attribute tells a multi-process run not to gather
the sharded student for them.

Built-ins and plugins are found the same way: through the entry-point group `stableopd.backends`
(this package declares `hf` and `vllm` there). A plugin package adds, in its pyproject.toml,

    [project.entry-points."stableopd.backends"]
    mine = "my_pkg.backend:MyBackend"

where `MyBackend(model=..., tokenizer=..., model_path=..., stop_ids=..., options=dict)` implements the
`Backend` protocol. See examples/plugin_backend/ for a complete one. A training step hands the backend all
of its prompts in one `generate` call, so a backend batches them as it can; an optional `prompts_per_call`
attribute sets how many prompts go in each call where a progress bar is shown (`rollout`, `eval`).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from stableopd.errors import UserError
from stableopd.types import Sample, SamplingParams

__all__ = ["Backend", "Sample", "SamplingParams", "build_backend", "parse_options"]


def parse_options(model: type, backend: str, options: dict[str, Any], key: str = "sampling.options"):
    """`model(**options)` for a backend's pydantic options model; a UserError naming the key (under `key`)
    otherwise."""
    from pydantic import ValidationError

    try:
        return model(**options)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            raise UserError(
                f"unknown {backend} option '{key}.{loc}'; valid: {', '.join(model.model_fields)}"
            ) from None
        if not loc:  # a rule across several options
            raise UserError(f"{key}: {e['msg'].removeprefix('Value error, ')}") from None
        raise UserError(f"{key}.{loc}: {e['msg']} (got {e.get('input')!r})") from None


ENTRY_POINT_GROUP = "stableopd.backends"
# Used when the package's own metadata is missing (e.g. running from a source tree that was not installed).
BUILTIN_BACKENDS = {"hf": "stableopd.backends.hf:HFBackend", "vllm": "stableopd.backends.vllm:VLLMBackend"}


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, prompts_P: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        """(P prompts) -> P lists of params.n samples, in prompt order."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the next `generate` sample from `model`'s current weights (no-op when shared)."""
        ...


def available_backends() -> dict[str, str]:
    """name -> "module:attr" for every registered backend (built-ins and plugins)."""
    found = dict(BUILTIN_BACKENDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def _load_target(target: str):
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value == target:
            return ep.load()
    import importlib

    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_backend(
    name: str,
    *,
    model: Any,
    tokenizer: Any,
    model_path: str,
    stop_ids: list[int],
    options: dict[str, Any] | None = None,
) -> Backend:
    """Instantiate the backend registered as `name`; unknown names list the available ones."""
    registry = available_backends()
    if name not in registry:
        raise UserError(f"unknown sampling backend '{name}'; available: {', '.join(sorted(registry))}")
    try:
        cls = _load_target(registry[name])
    except ImportError as exc:
        raise UserError(f"sampling backend '{name}' cannot be imported ({exc})") from None
    backend = cls(
        model=model,
        tokenizer=tokenizer,
        model_path=model_path,
        stop_ids=stop_ids,
        options=dict(options or {}),
    )
    if not isinstance(backend, Backend):
        raise UserError(
            f"sampling backend '{name}' ({registry[name]}) does not implement generate/sync_weights"
        )
    return backend


def split_stop(sample: Sample, stop_ids: list[int]) -> tuple[list[int], list[float], bool]:
    """(response ids without the stop token, their log-probs, truncated?) for a sample."""
    if sample.finish_reason == "stop" and sample.token_ids and sample.token_ids[-1] in stop_ids:
        return sample.token_ids[:-1], sample.logprobs[:-1], False
    return list(sample.token_ids), list(sample.logprobs), sample.finish_reason == "length"
