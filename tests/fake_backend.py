"""A fast sampler for tests of a run's machinery (checkpoints, resume, signals, locks, trackers, CLI), which
need rollouts but not the model's own text. conftest.py registers it as backend `fake` through the real
entry-point group, so `-s sampling.backend=fake` finds it in-process and in subprocesses alike.

It draws each response's length and tokens from a generator seeded by `SamplingParams.seed` (banned ids
never drawn; about half the responses end on a stop token within the budget, the rest fill it), then scores
them under the model with one teacher-forced forward: the log-probs it reports are the policy's, so the
trainer's sampler/trainer agreement check holds. No decode loop, so a step samples in one forward.
"""

from __future__ import annotations

from typing import Any

import torch

from stableopd.types import Sample, SamplingParams


class FakeBackend:
    name = "fake"

    def __init__(
        self, *, model: Any, tokenizer: Any, model_path: str, stop_ids: list[int], options: dict[str, Any]
    ) -> None:
        self.model, self.stop_ids = model, list(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.vocab_size = len(tokenizer)

    def sync_weights(self, model: Any) -> None:
        self.model = model

    def generate(self, prompts_P: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        gen = torch.Generator().manual_seed(params.seed)
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[list(self.stop_ids) + list(params.banned_token_ids)] = False
        pool = allowed.nonzero()[:, 0]  # (A,) ids a response body may hold
        rows = [(p, self._draw(pool, params.max_new_tokens, gen)) for p in prompts_P for _ in range(params.n)]
        lps = self._logprobs(rows, params.temperature)
        out = [
            Sample(token_ids=t, logprobs=lp, finish_reason="stop" if t[-1] in self.stop_ids else "length")
            for (_, t), lp in zip(rows, lps)
        ]
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts_P))]

    def _draw(self, pool: torch.Tensor, budget: int, gen: torch.Generator) -> list[int]:
        """About half the responses stop on a stop token somewhere within the budget; the rest use it all."""
        stops = bool(torch.randint(2, (), generator=gen))
        length = int(torch.randint(1, budget + 1, (), generator=gen)) if stops else budget
        body = pool[torch.randint(len(pool), (length,), generator=gen)].tolist()
        if stops:
            body[-1] = self.stop_ids[0]
        return body

    @torch.no_grad()
    def _logprobs(self, rows: list[tuple[list[int], list[int]]], temperature: float) -> list[list[float]]:
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L), right-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for i, (p, t) in enumerate(rows):
            ids[i, : len(p) + len(t)] = torch.tensor(p + t)
            mask[i, : len(p) + len(t)] = 1
        device = next(self.model.parameters()).device
        logits = self.model(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).logits.float()  # (B, L, V)
        logits = logits[..., : self.vocab_size] / (temperature if temperature > 0 else 1.0)
        logp = torch.log_softmax(logits, dim=-1)  # (B, L, V)
        out = []
        for i, (p, t) in enumerate(rows):
            pos = torch.arange(
                len(p) - 1, len(p) + len(t) - 1
            )  # the positions that predict each response token
            out.append(logp[i, pos, torch.tensor(t)].tolist())
        return out
