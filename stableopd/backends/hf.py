"""Hugging Face `generate` backend: batched, left-padded sampling from the training model itself.

It shares the trainer's model object, so there is no weight copy and `sync_weights` has nothing to do.
`logprobs` are taken from generate's processed scores: the log-softmax of the logits after temperature,
top-k and top-p, i.e. the distribution each token was actually drawn from. Embedding rows past the
tokenizer's vocabulary (padding, e.g. Qwen2.5's 151,936 rows for 151,665 tokens) are masked out, the
same restriction the trainer's kernels apply, and so are `params.banned_token_ids`. At temperature 1 with no
top-k/top-p they equal the teacher-forced log-probs of the same model (tests/test_backends.py checks
this). With temperature 0 (greedy) no warper runs and they are the temperature-1 log-probs of the argmax.

Sampling is reproducible: each call seeds its own RNG stream from `params.seed` and restores the
global RNG afterwards, so sampling does not perturb training randomness (and resume stays exact).

Options (`sampling.options`):
- `batch_size`: prompts per generate call (default 16).
- `cache`: `dynamic` (default) or `static`, generate's `cache_implementation`.
- `compile`: true compiles generate's decode step with torch.compile (needs `cache: static`; on a GPU,
  transformers compiles a static cache's decode step on its own unless this is false).
Both default off because they were slower on CPU for the built-in models (README, "Sampling speed").
"""

from __future__ import annotations

from typing import Any

import torch

from stableopd.backends.hf_options import parse_options
from stableopd.types import Sample, SamplingParams


class _MaskTokens:
    """Logits processor: rows past the tokenizer's vocabulary (embedding padding) and banned ids can never be
    sampled."""

    def __init__(self, vocab_size: int, banned: tuple[int, ...] = ()) -> None:
        self.vocab_size, self.banned = vocab_size, list(banned)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores[:, self.vocab_size :] = float("-inf")
        if self.banned:
            scores[:, self.banned] = float("-inf")
        return scores


class HFBackend:
    name = "hf"

    def __init__(
        self, *, model: Any, tokenizer: Any, model_path: str, stop_ids: list[int], options: dict[str, Any]
    ) -> None:
        self.options = parse_options(options)
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        self.vocab_size = len(tokenizer)
        self.prompts_per_call = self.options.batch_size

    def sync_weights(self, model: Any) -> None:
        self.model = model  # same object as the trainer's: nothing to copy

    def _gen_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        greedy = params.temperature == 0
        # Every knob is explicit: generate() fills unset (None) ones from the model's generation_config.json
        # (Qwen2.5-Instruct: top_k=20, top_p=0.8, repetition_penalty=1.05) and then from global defaults
        # (top_k=50), which would change the distribution and the logprobs. 1.0 / 0 are "off". Greedy
        # decoding applies no sampling knob at all (do_sample=False), so its top_k stays unset: an explicit
        # 0 there only earns a "flags are not valid" warning from transformers.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=1,  # prompts are repeated n times instead: greedy refuses n > 1
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
            cache_implementation="static" if self.options.cache == "static" else None,
            **self._compile_settings(),
        )

    def _compile_settings(self) -> dict[str, Any]:
        if not self.options.compile:
            return {"disable_compile": True}
        from transformers import CompileConfig

        if next(self.model.parameters()).device.type != "cpu":
            return {"compile_config": CompileConfig(fullgraph=False, dynamic=False)}  # CUDA graphs
        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        return {"compile_config": config}

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, L)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, seed: int
    ) -> list[list[Sample]]:
        from transformers import LogitsProcessorList

        # each prompt n times in a row, as generate's num_return_sequences would (rows [i*n, (i+1)*n) = prompt i)
        ids, mask = self._left_pad([p for p in prompts for _ in range(params.n)])
        was_training = self.model.training
        self.model.eval()
        devices = [ids.device] if ids.device.type == "cuda" else []
        masks = LogitsProcessorList([_MaskTokens(self.vocab_size, params.banned_token_ids)])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=self._gen_config(params),
                logits_processor=masks,
            )
        if was_training:
            self.model.train()
        gen = out.sequences[:, ids.shape[1] :]  # (B*n, T)
        # the log-prob of each drawn token under its step's processed logits, one step at a time: never a
        # (B*n, T, V) copy of the scores
        logprobs = torch.stack(
            [
                torch.log_softmax(step.float(), dim=-1).gather(-1, gen[:, t, None])[:, 0]
                for t, step in enumerate(out.scores)
            ],
            dim=1,
        ).cpu()  # (B*n, T)
        gen = gen.cpu()
        results: list[list[Sample]] = []
        for row in range(gen.shape[0]):
            toks = gen[row].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in self.stop_ids), None)
            reason = "stop" if end is not None else "length"
            end = end if end is not None else len(toks)
            sample = Sample(token_ids=toks[:end], logprobs=logprobs[row, :end].tolist(), finish_reason=reason)
            if row % params.n == 0:
                results.append([])
            results[-1].append(sample)
        return results

    def generate(self, prompts_P: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        size = self.options.batch_size
        for start in range(0, len(prompts_P), size):
            # a distinct, reproducible stream per batch; independent of how many batches ran before
            out.extend(
                self._generate_batch(prompts_P[start : start + size], params, params.seed * 100_003 + start)
            )
        return out
