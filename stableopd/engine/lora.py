"""LoRA students through peft: `student.lora: {r, alpha, dropout, target_modules}`.

Only the adapter trains. The reference for the KL term is the same model with the adapter switched off
(`AdapterOff`), which is exactly the student as loaded, so no second copy of the student is kept. A
checkpoint holds the adapter (adapter_model.safetensors, adapter_config.json naming the base model as
`student.name` was written) with the tokenizer; `load_adapter_model` reads one back as a merged model for
`eval` and `rollout`, and `stableopd export RUN --merge` writes a merged Hugging Face model that
transformers and vLLM load unchanged. The vLLM sampler receives merged weights (`merged_weights`), computed
without touching the trained tensors.

    stableopd distill -c examples/quickstart.yaml -s student.lora.r=16
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from stableopd.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


def import_peft():
    try:
        import peft
    except ImportError:
        raise UserError("student.lora needs peft: pip install 'stableopd[lora]'") from None
    return peft


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def attach(model, spec, *, base_name: str, adapter_dir: str | Path | None = None, seed: int = 0):
    """`model` with a trainable LoRA adapter: a new one from `spec` (A drawn from `seed`, B = 0, so the student
    is unchanged), or the one saved in `adapter_dir` (resume), which must have been made with the same
    settings."""
    peft = import_peft()
    if adapter_dir is not None:
        saved = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
        want = {"r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout}
        got = {k: saved.get(k) for k in want}
        if got != want:
            raise UserError(
                f"student.lora {want} differs from the adapter in '{adapter_dir}' ({got}); "
                "resume with the run's own student.lora"
            )
        with _quiet():
            model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        target = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        config = peft.LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=target,
            task_type="CAUSAL_LM",
        )
        try:
            with (
                torch.random.fork_rng(devices=[]),
                _quiet(),
            ):  # the same adapter for a seed, whatever ran before
                torch.manual_seed(seed)
                model = peft.get_peft_model(model, config)
        except ValueError as exc:  # target modules not found in the model
            raise UserError(f"student.lora.target_modules: {exc}") from None
    model.peft_config["default"].base_model_name_or_path = base_name
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise UserError(
            "student.lora.target_modules adapts the output head, which the fused loss kernels read as "
            "a plain weight; name the decoder's layers instead"
        )
    return model


class AdapterOff:
    """The reference model: the student's own modules with its adapter disabled (read-only, no copy).

    The fused losses read a model through `get_decoder()` and `get_output_embeddings()`; here the decoder runs
    inside peft's `disable_adapter()`, and the head is the student's (never adapted)."""

    def __init__(self, model) -> None:
        self.peft_model = model

    def get_decoder(self):
        decoder, peft_model = self.peft_model.get_decoder(), self.peft_model

        def run(**kwargs):
            with peft_model.disable_adapter():
                return decoder(**kwargs)

        return run

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()


def _lora_layers(model) -> dict[str, Any]:
    """Hugging Face module name -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The merged model's state dict under Hugging Face names: W + scale * B @ A for adapted layers, every
    other tensor as it is. Computed aside, without merging in place (which would round the trained weights)."""
    layers = _lora_layers(model)
    out = {}
    with torch.no_grad():
        for name, tensor in model.get_base_model().state_dict().items():
            if ".lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module in layers:
                layer = layers[module]
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                tensor = tensor + delta
            out[name] = tensor.detach()
    return out


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on, as stableopd wrote it (student.name)."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"'{path}' holds a LoRA adapter that does not name its base model "
            f"(base_model_name_or_path in {ADAPTER_CONFIG})"
        )
    return base


def load_adapter_model(path: str | Path, base_model):
    """`base_model` with the adapter in `path` merged into its weights (a plain transformers model)."""
    peft = import_peft()
    with _quiet():
        return peft.PeftModel.from_pretrained(base_model, str(path)).merge_and_unload()


@contextlib.contextmanager
def _quiet():
    """peft reads transformers' deprecated `is_gradient_checkpointing`: its FutureWarning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_count(model) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
