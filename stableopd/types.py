"""The records that cross layers: a prompt with its reference answer, sampling parameters, a backend's sample,
a golden sequence for the SFT term."""

from __future__ import annotations

from dataclasses import dataclass, field
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
