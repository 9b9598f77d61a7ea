"""The records that cross layers: a prompt with its reference answer, sampling parameters, a backend's sample,
a rollout record, a golden sequence for the SFT term."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    answer: str | None = None
    solution: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    seed: int = 0
    banned_token_ids: tuple[int, ...] = ()  # ids that must never be sampled (stableopd/models/pairing.py)


@dataclass
class Sample:
    token_ids: list[int]  # (T,) includes the stop token when finish_reason == "stop"
    logprobs: list[float]  # (T,) sampler log-prob of each sampled token
    finish_reason: Literal["stop", "length"]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GoldSeq:
    prompt: list[int]
    target: list[int]  # golden solution ids plus the stop token


@dataclass
class Rollout:
    """One sampled response, from the backend to the records files (README, "Run directory").

    `response_token_ids` and `response` exclude the stop token; `sampler_logprobs` are aligned with them, and
    the stop token's log-prob, when there is one, is `stop_logprob` (the trainer trains the stop token too).
    `truncated` is true exactly when no stop token came within the budget. A stage adds its own fields to
    `extra` (the step, the teacher's view, the checked answer); the file holds them after the record's own.
    """

    prompt_id: str
    sample_idx: int
    prompt: str
    prompt_token_ids: list[int]
    response: str
    response_token_ids: list[int]
    sampler_logprobs: list[float]
    n_tokens: int
    finish_reason: Literal["stop", "length"]
    truncated: bool
    repetitive: bool
    compression_ratio: float
    stop_token_id: int | None
    stop_logprob: float | None
    answer: str | None = None  # the example's reference answer, when it has one
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> list[int]:
        """The tokens a step trains on: the response, then its stop token when it stopped."""
        return self.response_token_ids + ([] if self.truncated else [self.stop_token_id])

    @property
    def target_logprobs(self) -> list[float]:
        """The sampler's log-probs of `target`."""
        return self.sampler_logprobs + ([] if self.truncated else [self.stop_logprob])

    def to_json(self) -> dict[str, Any]:
        """The record as a line of a records file: its fields, `answer` when there is one, then `extra`."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("answer", "extra")}
        if self.answer is not None:
            row["answer"] = self.answer
        return {**row, **self.extra}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Rollout:
        """A record read back from a records file; fields a stage added go to `extra`."""
        own = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in row.items() if k in own}, extra={k: v for k, v in row.items() if k not in own}
        )
