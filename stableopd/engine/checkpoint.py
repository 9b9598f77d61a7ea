"""Checkpoints: the student in Hugging Face format plus trainer state, written atomically.

    RUN_DIR/checkpoints/step_000040/
        config.json, model.safetensors, tokenizer files   loadable by AutoModelForCausalLM and vLLM
          (a LoRA student: adapter_config.json, adapter_model.safetensors; see stableopd/engine/lora.py)
        trainer_state.json                                step, data position, counters
        optimizer.pt, rng.pt                              tensors only: loaded with weights_only=True
        COMPLETE                                          written last: the SHA-256 of every file above

A checkpoint is assembled in a temporary sibling directory and renamed into place, and only directories
holding `COMPLETE` count, so a run killed at any moment never leaves one that resume would pick. If the
latest complete checkpoint is unreadable anyway (a damaged disk, a hand edit), `load_latest` warns and
falls back to the previous one; damage anywhere in any file is caught by the checksums, which resume
verifies before it reads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stableopd.engine.lora import is_peft
from stableopd.errors import UserError

MARKER = "COMPLETE"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / MARKER).exists() and p.name[5:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    state: dict[str, Any],
    keep_last: int,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`. `model_state` and
    `optimizer_state` are the full (consolidated) state dicts of a sharded run (distributed.full_states)."""
    target = step_dir(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(".step_*"):  # temp dirs of writes that a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        kw = {"state_dict": model_state} if model_state is not None else {}
        adapter = is_peft(model)
        if adapter:  # a LoRA adapter: its embeddings are the base model's, never saved
            kw["save_embedding_layers"] = False
        model.save_pretrained(tmp, safe_serialization=True, **kw)
        tokenizer.save_pretrained(tmp)
        if adapter and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)  # keep the base's stop ids beside the adapter
        torch.save(
            optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt"
        )
        rng = rng_state()
        torch.save({"torch": rng["torch"], "python": _py_rng_to_tensorable(rng["python"])}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / MARKER).write_text(json.dumps({"sha256": checksums(tmp)}, indent=1) + "\n")
        if target.exists():  # re-saving a step (after a fallback resume): unmark it first, so a kill
            (target / MARKER).unlink(missing_ok=True)  # inside rmtree leaves no half-deleted "complete" one
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _py_rng_to_tensorable(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_rng_from(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


@dataclass
class Restored:
    path: Path
    step: int
    state: dict[str, Any]
    optimizer_state: dict[str, Any]
    rng: dict[str, Any]


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in a checkpoint folder (the marker excepted), by name."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != MARKER:
            digest = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
            out[f.name] = digest.hexdigest()
    return out


def verify(path: Path) -> None:
    """Raise ValueError naming the first file of checkpoint `path` that is missing or differs from its
    checksum at save time. Checkpoints written before checksums existed hold "ok" and pass."""
    text = (path / MARKER).read_text(encoding="utf-8", errors="replace")
    if text.strip() == "ok":
        return
    try:
        expected = json.loads(text)["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"its {MARKER} marker is damaged") from None
    actual = checksums(path)
    for name, digest in expected.items():
        if name not in actual:
            raise ValueError(f"{name} is missing")
        if actual[name] != digest:
            raise ValueError(f"{name} does not match its checksum (cut short or corrupted)")


def read_checkpoint(path: Path) -> Restored:
    verify(path)
    state = json.loads((path / "trainer_state.json").read_text())
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    shards = sorted(path.glob("model*.safetensors")) + sorted(path.glob("adapter_model.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model weights in {path}")
    from safetensors import safe_open

    for shard in shards:  # reads each header and checks it against the file size
        with safe_open(shard, framework="pt") as fh:
            fh.keys()
    return Restored(
        path=path,
        step=int(state["step"]),
        state=state,
        optimizer_state=optim,
        rng={"torch": rng["torch"], "python": _py_rng_from(rng["python"])},
    )


def load_latest(run_dir: Path, warn) -> Restored:
    """The newest readable complete checkpoint; unreadable ones are skipped with a warning."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume: '{run_dir}' has no complete checkpoint; start without --resume")
    for path in reversed(found):
        try:
            return read_checkpoint(path)
        except Exception as exc:  # any damage: fall back to the previous checkpoint
            warn(
                f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {exc}); trying the previous one"
            )
    raise UserError(f"--resume: every checkpoint in '{run_dir}/checkpoints' is unreadable")
