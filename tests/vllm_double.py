"""A TEST DOUBLE of the slice of vLLM's offline API that stableopd.backends.vllm uses.

It follows vLLM 0.33.0 as read from its source: vllm/entrypoints/llm.py (LLM.__init__ keywords,
LLM.generate(prompts, sampling_params, *, use_tqdm) with one SamplingParams per prompt allowed,
reset_prefix_cache, sleep(level), wake_up(tags), collective_rpc), vllm/sampling_params.py (field names;
temperature 0 = greedy; top_k 0 = off; logprobs=0 returns only the sampled token), vllm/outputs.py
(RequestOutput.outputs / .prompt_logprobs, CompletionOutput.token_ids / .logprobs / .finish_reason /
.stop_reason), vllm/logprobs.py (list of dict[token_id, Logprob(logprob, rank, decoded_token)]), and the
in-process engine path llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights
taking (Hugging Face name, tensor) pairs. Like vLLM's `processed_logprobs` mode, sampled log-probs are
those of the distribution after temperature, top-k and top-p; token_ids include the stop token.

The engine keeps ITS OWN COPY of the weights, loaded from the model path, so a weight sync that does
not happen leaves it sampling from stale weights, as a real engine would.

What this cannot cover: CUDA, paged attention and its numerics, tensor parallelism, vLLM's scheduler and
batching, the cumem allocator behind sleep mode, fused qkv/gate_up parameter layouts (names are mapped
one to one here), and API drift in vLLM versions other than 0.33. Those run in the `vllm`-marked tests
on a GPU machine.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if self.temperature < 1e-5 and self.n > 1:
            raise ValueError("n must be 1 when using greedy sampling")


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    text: str = ""


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    finished: bool = True


class _EngineModel:
    def __init__(self, hf_model) -> None:
        self.hf_model = hf_model
        self.loads = 0

    def load_weights(self, weights) -> set[str]:
        params = dict(self.hf_model.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                loaded.add(name)
        self.loads += 1
        return loaded


def _processed_logprobs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    logits = logits.float().clone()
    if sp.allowed_token_ids is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[sp.allowed_token_ids] = 0.0
        logits = logits + mask
    if sp.temperature < 1e-5:
        return torch.log_softmax(logits, -1)
    logits = logits / sp.temperature
    if sp.top_k > 0:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if sp.top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], -1)
        drop = torch.cumsum(probs, -1) - probs > sp.top_p
        logits[order[drop]] = float("-inf")
    return torch.log_softmax(logits, -1)


def _check_launcher(kwargs: dict[str, Any]) -> None:
    """vLLM inside a torchrun-launched process group: one engine per rank needs the external_launcher executor
    with data_parallel_size equal to the group's size (vllm/config/parallel.py, and
    examples/offline_inference/torchrun_dp_example.py); any other executor would start its own workers."""
    import torch.distributed as td

    world = td.get_world_size() if td.is_available() and td.is_initialized() else 1
    backend = kwargs.get("distributed_executor_backend")
    if backend == "external_launcher":
        if world == 1:
            raise RuntimeError("external_launcher needs torch.distributed initialised by the launcher")
        if kwargs.get("data_parallel_size", 1) * kwargs.get("tensor_parallel_size", 1) != world:
            raise RuntimeError(f"data_parallel_size x tensor_parallel_size must equal the world size {world}")
    elif world > 1:
        raise RuntimeError(
            "vLLM engine in a torchrun process group without distributed_executor_backend='external_launcher'"
        )


class LLM:
    instances: list[LLM] = []

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.init_kwargs = {"model": model, "tokenizer": tokenizer, **kwargs}
        _check_launcher(kwargs)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, local_files_only=True)
        for key, value in (kwargs.get("hf_overrides") or {}).items():  # a dict: set on the HF config
            setattr(config, key, value)
        hf = AutoModelForCausalLM.from_pretrained(
            model, config=config, local_files_only=True, dtype=torch.float32
        ).eval()
        self.engine_model = _EngineModel(hf)
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=self.engine_model))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker))
        )
        self.calls: list[str] = []
        LLM.instances.append(self)

    @torch.no_grad()
    def _sample(
        self, prompt: list[int], sp: SamplingParams, index: int, gen: torch.Generator
    ) -> CompletionOutput:
        ids, lps, reason, stop_reason = list(prompt), [], "length", None
        stops = set(sp.stop_token_ids or [])
        for _ in range(sp.max_tokens):
            logits = self.engine_model.hf_model(torch.tensor([ids])).logits[0, -1]
            logp = _processed_logprobs(logits, sp)
            if sp.temperature < 1e-5:
                tok = int(torch.argmax(logp))
            else:
                tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
            ids.append(tok)
            lps.append({tok: Logprob(float(logp[tok]), rank=1)})
            if tok in stops and not sp.ignore_eos:
                reason, stop_reason = "stop", tok
                break
        return CompletionOutput(
            index, ids[len(prompt) :], lps if sp.logprobs is not None else None, reason, stop_reason
        )

    @torch.no_grad()
    def _prompt_logprobs(self, prompt: list[int]) -> list[dict[int, Logprob] | None]:
        logits = self.engine_model.hf_model(torch.tensor([prompt])).logits[0]  # raw: temperature ignored
        logp = torch.log_softmax(logits.float(), -1)
        return [None] + [{tok: Logprob(float(logp[i, tok]))} for i, tok in enumerate(prompt[1:])]

    def generate(
        self, prompts, sampling_params=None, *, use_tqdm: bool = True, **_: Any
    ) -> list[RequestOutput]:
        self.calls.append("generate")
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        outs = []
        for prompt, sp in zip(prompts, sps):
            ids = list(prompt["prompt_token_ids"])
            gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
            completions = [self._sample(ids, sp, i, gen) for i in range(sp.n)]
            plp = self._prompt_logprobs(ids) if sp.prompt_logprobs is not None else None
            outs.append(RequestOutput(ids, completions, plp))
        return outs

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append("reset_prefix_cache")
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(f"wake_up({','.join(tags) if tags else 'all'})")
        return True

    def collective_rpc(self, method: str, timeout=None, args=(), kwargs=None):
        self.calls.append(f"collective_rpc({method})")
        if method == "reload_weights":
            self.engine_model.load_weights(kwargs["weights_iterator"])
        return [None]


@dataclass
class FakeVLLM:
    module: types.ModuleType = field(init=False)

    def __post_init__(self) -> None:
        mod = types.ModuleType("vllm")
        mod.LLM, mod.SamplingParams, mod.__version__ = LLM, SamplingParams, "0.33.0-test-double"
        self.module = mod

    def install(self, monkeypatch) -> types.ModuleType:
        LLM.instances.clear()
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        return self.module
