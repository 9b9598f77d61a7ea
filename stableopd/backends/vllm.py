"""vLLM backend: a colocated engine that samples from token ids, and teacher scoring with prompt_logprobs.

Written against vLLM 0.33's offline API (vllm/entrypoints/llm.py, sampling_params.py, outputs.py).
Importing this module never imports vllm; building the backend does, and without vllm installed it
stops with the install command.

Sampling: prompts go in as token ids (`{"prompt_token_ids": ...}`, no re-tokenisation), one
SamplingParams per prompt so every prompt gets its own seed, `logprobs=0` (only the sampled token) and
the engine built with `logprobs_mode="processed_logprobs"`: the log-probs of the distribution each
token was drawn from, after temperature / top-k / top-p, the same contract as the HF backend. vLLM's
`token_ids` include the stop token, so a sample that ends on one is reported as "stop" with that token
last. When the model's embedding has padded rows, `allowed_token_ids` keeps sampling inside the
tokenizer's vocabulary, as the trainer's kernels do.

Weight sync: the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and `sync_weights`
pushes the student's tensors, under their Hugging Face names, through the model's `load_weights`
(which stacks q/k/v and gate/up itself), then resets the prefix cache: vLLM does not, and cached KV
blocks computed with the old weights would otherwise be reused. Nothing touches the disk. Whether the
sync took is verified by the trainer every step (`diag/kl_sample_train`, `sampling.max_sync_mismatch`).
Under torchrun each rank hosts its own engine (`engine_kwargs`: vLLM's external_launcher executor, one
data-parallel replica per rank) and every rank gathers the sharded student's full weights to push them.

Teacher scoring (`teacher.engine: vllm`): `prompt_logprobs=0` on prompt + response. vLLM computes them
from raw logits whatever the temperature, so a teacher temperature other than 1 is refused. They are
normalised over every embedding row, padding included, where the HF path normalises over the
tokenizer's vocabulary; trained checkpoints put ~0 mass on padded rows, so the two agree in practice.

    stableopd distill -c examples/paper-qwen-math-1.5b.yaml     # sampling.backend: vllm
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stableopd.backends import base
from stableopd.errors import UserError
from stableopd.types import Sample, SamplingParams

INSTALL_HINT = "pip install 'stableopd[vllm]' (needs a CUDA machine)"
MAX_TEMPERATURE = 2.0  # vLLM rejects temperatures above 2
_NAME_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class VLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enable_sleep_mode: bool = False
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: str = "auto"
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    sync_every: int = Field(default=1, ge=1)  # push weights every k optimizer steps

    def engine_kwargs(self) -> dict[str, Any]:
        kw = self.model_dump(exclude={"sync_every"})
        return {k: v for k, v in kw.items() if v is not None}


def parse_options(options: dict[str, Any], key: str = "sampling.options") -> VLLMOptions:
    return base.parse_options(VLLMOptions, "vllm", options, key)


def engine_kwargs(options: VLLMOptions, hf_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """vllm.LLM keywords: the options, the model's config overrides, and under torchrun vLLM's
    `external_launcher` executor with one data-parallel replica per rank (tensor_parallel_size 1, checked
    by distributed.check_launch): every rank hosts its own engine on its own device inside the launcher's
    process group and samples or scores its share of the batch. The engine seed is the same on every rank,
    as vLLM asks; each request carries its own seed anyway."""
    kw = options.engine_kwargs()
    if hf_overrides:
        kw["hf_overrides"] = dict(hf_overrides)
    from stableopd.engine.distributed import launched_world

    if (world := launched_world()) > 1:
        kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world, seed=0)
    return kw


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError(f"sampling backend 'vllm' needs vLLM: {INSTALL_HINT}") from None
    return vllm


def sampling_kwargs(
    params: SamplingParams, stop_ids: list[int], *, seed: int, allowed_token_ids: list[int] | None
) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for one prompt."""
    if params.temperature > MAX_TEMPERATURE:
        raise UserError(f"sampling.temperature={params.temperature}: vLLM accepts at most {MAX_TEMPERATURE}")
    greedy = params.temperature == 0
    kw: dict[str, Any] = {
        "n": 1 if greedy else params.n,  # vLLM refuses n > 1 when greedy; the copies are identical anyway
        "temperature": params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 0 if greedy else params.top_k,
        "max_tokens": params.max_new_tokens,
        "seed": seed,
        "logprobs": 0,
        "stop_token_ids": list(stop_ids),
        "ignore_eos": False,
        "detokenize": False,
    }
    if allowed_token_ids is not None:
        kw["allowed_token_ids"] = allowed_token_ids
    return kw


def token_logprob(position: Any, token: int) -> float:
    """The log-prob of `token` in one position of vLLM's logprobs (dict[int, Logprob])."""
    entry = (position or {}).get(token)
    if entry is None:
        raise RuntimeError(f"vLLM returned no log-prob for the sampled token {token}; was logprobs=0 set?")
    return float(getattr(entry, "logprob", entry))


def parse_completion(completion: Any, stop_ids: list[int]) -> Sample:
    """vllm CompletionOutput -> Sample (token ids keep the stop token, as vLLM reports them)."""
    ids = list(completion.token_ids)
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no per-token log-probs; the backend always sets logprobs=0")
    lps = [token_logprob(pos, tok) for pos, tok in zip(completion.logprobs, ids)]
    stopped = completion.finish_reason == "stop" and bool(ids) and ids[-1] in stop_ids
    return Sample(token_ids=ids, logprobs=lps, finish_reason="stop" if stopped else "length")


def hf_weight_items(model) -> Iterator[tuple[str, Any]]:
    """(Hugging Face name, full tensor) for every weight, unwrapping compile/DDP/FSDP prefixes and DTensors; a
    LoRA student's weights are merged with its adapter (stableopd/engine/lora.py)."""
    from stableopd.engine.lora import is_peft, merged_weights

    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, tensor in (merged_weights(model) if is_peft(model) else model.state_dict()).items():
        for prefix in _NAME_PREFIXES:
            name = name.replace(prefix, "")
        if tied and name == "lm_head.weight":
            continue  # vLLM ties it to embed_tokens itself
        if hasattr(tensor, "full_tensor"):  # FSDP2 shards are DTensors
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def _engine_model(llm):
    """The in-process model of a uniproc engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), or None."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except AttributeError:
        return None


def push_weights(llm, model) -> None:
    target = _engine_model(llm)
    if target is not None:
        items = hf_weight_items(model)
        target.load_weights(weights=items)
        for _ in items:  # under FSDP each item is a collective: every rank gathers every weight
            pass
    else:  # multiprocess engine: reload through the workers
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(hf_weight_items(model))})
    llm.reset_prefix_cache()


def allowed_ids(vocab: int, rows: int | None, banned: tuple[int, ...]) -> list[int] | None:
    """vLLM's allowed_token_ids: the tokenizer's ids without the banned ones, or None when nothing is
    excluded (no embedding padding past the vocabulary, nothing banned)."""
    if not banned and not (rows and rows > vocab):
        return None
    out = set(banned)
    return [i for i in range(vocab) if i not in out]


class VLLMBackend:
    name = "vllm"
    own_weights = True  # the engine holds its own copy, pushed by sync_weights: nothing to gather to sample
    prompts_per_call = 256  # with a progress bar; the engine schedules each call's sequences itself

    def __init__(
        self, *, model: Any, tokenizer: Any, model_path: str, stop_ids: list[int], options: dict[str, Any]
    ) -> None:
        self.options = parse_options(options)
        from stableopd.engine.lora import is_adapter_dir, is_peft

        if is_adapter_dir(model_path):
            raise UserError(
                f"'{model_path}' is a LoRA adapter, which the vllm backend does not load: write a merged "
                "model with `stableopd export RUN_DIR --merge --out DIR` and sample DIR"
            )
        from stableopd.models.loading import config_overrides_of

        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pushed without IPC
        self._vllm, self.stop_ids = vllm, list(stop_ids)
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            logprobs_mode="processed_logprobs",
            **engine_kwargs(self.options, config_overrides_of(model)),
        )
        from transformers import AutoConfig

        self.rows = getattr(AutoConfig.from_pretrained(model_path), "vocab_size", None)
        self.vocab = len(tokenizer)
        self.asleep, self.updates = False, 0
        if is_peft(
            model
        ):  # the engine loaded the base model: give it the adapter's (possibly resumed) weights
            push_weights(self.llm, model)

    def generate(self, prompts_P: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        allowed = allowed_ids(self.vocab, self.rows, params.banned_token_ids)
        per_prompt = [
            self._vllm.SamplingParams(
                **sampling_kwargs(
                    params, self.stop_ids, seed=params.seed * 100_003 + i, allowed_token_ids=allowed
                )
            )
            for i in range(len(prompts_P))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts_P], per_prompt, use_tqdm=False
        )
        samples = [[parse_completion(c, self.stop_ids) for c in out.outputs] for out in outputs]
        if params.temperature == 0 and params.n > 1:
            samples = [s * params.n for s in samples]
        if self.options.enable_sleep_mode:  # free the GPU for the training step
            self.llm.sleep(level=1)
            self.asleep = True
        return samples

    def sync_weights(self, model: Any) -> None:
        self.updates += 1
        if self.updates % self.options.sync_every:
            return
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        push_weights(self.llm, model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


class VLLMScorer:
    """Teacher log-probs of response tokens via vLLM `prompt_logprobs` (temperature 1 only)."""

    def __init__(
        self, model_path: str, options: dict[str, Any], *, hf_overrides: dict[str, Any] | None = None
    ) -> None:
        self.options = parse_options(options, "teacher.engine_options")
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path, tokenizer=model_path, **engine_kwargs(self.options, hf_overrides)
        )

    def score(
        self, prompts: list[list[int]], targets: list[list[int]], *, temperature: float = 1.0
    ) -> list[list[float]]:
        check_scoring_temperature(temperature)
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p) + list(t)} for p, t in zip(prompts, targets)], sp, use_tqdm=False
        )
        return [parse_prompt_logprobs(o.prompt_logprobs, p, t) for o, p, t in zip(outs, prompts, targets)]


def check_scoring_temperature(temperature: float) -> None:
    if temperature != 1.0:
        raise UserError(
            f"loss.teacher_temperature={temperature} with teacher.engine=vllm: vLLM's prompt log-probs "
            "ignore temperature, so they would be silently wrong; use 1.0 or teacher.engine=hf"
        )


def parse_prompt_logprobs(prompt_logprobs: list, prompt: list[int], target: list[int]) -> list[float]:
    """Log-probs of the target tokens from the prompt_logprobs of prompt + target (entry 0 is None)."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(prompt) + len(target):
        raise RuntimeError("vLLM returned prompt_logprobs of the wrong length; was prompt_logprobs=0 set?")
    return [token_logprob(prompt_logprobs[len(prompt) + i], tok) for i, tok in enumerate(target)]
