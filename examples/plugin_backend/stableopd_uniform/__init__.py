"""A minimal stableopd sampling backend, registered under the entry-point group `stableopd.backends`.

It samples every token uniformly from the tokenizer's vocabulary, so its log-probs are exactly
-log(V): the contract every backend keeps (the log-prob of each sampled token under the distribution
it was drawn from). Copy this file to wrap another engine: implement `generate` and `sync_weights`.

    pip install -e examples/plugin_backend
    stableopd rollout --model tiny --data builtin:arith -s sampling.backend=uniform -s sampling.max_new_tokens=8
"""

from __future__ import annotations

import math
import random
from typing import Any

from stableopd.backends.base import Sample, SamplingParams


class UniformBackend:
    name = "uniform"

    def __init__(
        self, *, model: Any, tokenizer: Any, model_path: str, stop_ids: list[int], options: dict[str, Any]
    ) -> None:
        if options:
            raise ValueError(f"the uniform backend takes no options, got {sorted(options)}")
        self.vocab = len(tokenizer)
        self.stop_ids = set(stop_ids)

    def generate(self, prompts_P: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        rng = random.Random(params.seed)
        logprob = -math.log(self.vocab)
        out = []
        for _ in prompts_P:
            samples = []
            for _ in range(params.n):
                ids: list[int] = []
                while len(ids) < params.max_new_tokens:
                    ids.append(rng.randrange(self.vocab))
                    if ids[-1] in self.stop_ids:
                        break
                stopped = bool(ids) and ids[-1] in self.stop_ids
                samples.append(
                    Sample(
                        token_ids=ids,
                        logprobs=[logprob] * len(ids),
                        finish_reason="stop" if stopped else "length",
                    )
                )
            out.append(samples)
        return out

    def sync_weights(self, model: Any) -> None:
        """Nothing to sync: this backend holds no weights."""
