"""`stableopd export RUN_DIR`: a run's checkpoint as a plain Hugging Face model directory.

Without `--merge` the model files are copied as they are (for a LoRA run: the adapter, which peft and
vLLM's LoRA support load). `--merge` (LoRA runs) folds the adapter into the base weights in float32 and
writes a full model in the base model's dtype, which `AutoModelForCausalLM.from_pretrained` and vLLM load
unchanged. Trainer state (optimizer, RNG, counters) is never exported. The folder is written beside its
destination and renamed into place, so a kill leaves nothing half-written.

    stableopd export runs/lora --merge --out models/student-merged
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from stableopd.config import load_config
from stableopd.engine.checkpoint import MARKER
from stableopd.engine.lora import is_adapter_dir
from stableopd.errors import UserError
from stableopd.files import check_output_dir
from stableopd.stages.evaluate import resolve_target

TRAINER_FILES = {"optimizer.pt", "rng.pt", "trainer_state.json", MARKER}


def run_export(run: Path, *, step: int | None, out: Path | None, merge: bool, console) -> Path:
    run = Path(run)
    if not (run / "checkpoints").is_dir():
        raise UserError(
            f"'{run}' is not a run directory (no checkpoints/); export reads a distill or sft run"
        )
    _, chosen = resolve_target(str(run), step)
    ckpt = Path(chosen)
    adapter = is_adapter_dir(ckpt)
    if merge and not adapter:
        raise UserError(
            f"'{run}' trained full weights, so {ckpt.name} is already a full model: export without "
            "--merge (--merge folds a LoRA adapter into its base model)"
        )
    dest = out or run / "export" / f"{ckpt.name}{'-merged' if merge else ''}"
    check_output_dir(dest, "export folder")
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"export folder '{dest}' is not empty; pass another --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if merge:
            _write_merged(run, ckpt, tmp)
        else:
            for f in ckpt.iterdir():
                if f.is_file() and f.name not in TRAINER_FILES:
                    shutil.copy2(f, tmp / f.name)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    what = (
        "a merged model: AutoModelForCausalLM.from_pretrained and vLLM load it"
        if merge
        else "the LoRA adapter: load it with peft, or pass --merge for a full model"
        if adapter
        else "the model: AutoModelForCausalLM.from_pretrained and vLLM load it"
    )
    console.print(f"wrote {dest} ({ckpt.name} of {run}; {what})", highlight=False, soft_wrap=True)
    return dest


def _write_merged(run: Path, ckpt: Path, folder: Path) -> None:
    import torch

    from stableopd.engine.lora import adapter_base
    from stableopd.models.loading import drop_gguf_quantizer, load_model, resolve_model_path

    cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    spec = cfg.student if cfg else None
    loaded = load_model(
        str(ckpt),
        dtype="float32",
        device="cpu",
        revision=spec.revision if spec else None,
        trust_remote_code=spec.trust_remote_code if spec else False,
    )
    # the merged model keeps the dtype the student trained in: student.dtype, else the base model's own
    dtype = (
        spec.dtype
        if spec is not None and spec.dtype != "auto"
        else _saved_dtype(resolve_model_path(adapter_base(ckpt)))
    )
    if dtype in ("bfloat16", "float16"):
        loaded.model.to(getattr(torch, dtype))
    drop_gguf_quantizer(loaded.model)  # a student converted from GGUF (smollm2-135m)
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def _saved_dtype(model_dir: str) -> str | None:
    """The dtype in a local model's config.json (None for a hub id or when it names none)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    tree = json.loads(config.read_text())
    return tree.get("dtype") or tree.get("torch_dtype")
