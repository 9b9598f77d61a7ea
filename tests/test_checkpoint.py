"""Checkpoints (stableopd/engine/checkpoint.py): round trip, atomicity, retention and the fallback on damage.

The end-to-end kill-and-resume runs are in tests/test_trainer.py; these are the unit-level facts they
rest on, each against a real tiny model and a real AdamW state.

    pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stableopd.engine.checkpoint import (
    MARKER,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    step_dir,
)
from stableopd.errors import UserError


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny model with an AdamW that has taken one step (so it has moments to save)."""
    model = tiny.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the shared model's weights stay put
    model.zero_grad()
    model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.square().mean().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, tiny.tokenizer, optimizer


def save(run: Path, step: int, trained, keep_last: int = 10, **state) -> Path:
    model, tok, optimizer = trained
    return save_checkpoint(
        run,
        step,
        model=model,
        tokenizer=tok,
        optimizer=optimizer,
        state={"data_position": step * 4, **state},
        keep_last=keep_last,
    )


def names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def test_round_trip_restores_weights_optimizer_rng_and_state(tmp_path, trained):
    model, _, optimizer = trained
    torch.manual_seed(123)
    random.seed(456)
    path = save(tmp_path, 7, trained, skipped_total=2)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)

    restored = read_checkpoint(path)
    assert (restored.step, restored.state["data_position"], restored.state["skipped_total"]) == (7, 28, 2)
    set_rng_state(restored.rng)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    weights = load_file(path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(model.parameters(), lr=0.0)
    fresh.load_state_dict(restored.optimizer_state)
    for a, b in zip(fresh.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert len(fresh.state) == len(optimizer.state) > 0
    assert (path / MARKER).exists()


def test_only_complete_checkpoints_count_in_numeric_order(tmp_path, trained):
    for step in (9, 10, 1_000_000):
        save(tmp_path, step, trained)
    root = tmp_path / "checkpoints"
    (root / "step_000011").mkdir()  # no COMPLETE marker: a writer that died before finishing
    (root / ".step_000012.abcd").mkdir()  # a temp directory, even with a marker
    (root / ".step_000012.abcd" / MARKER).write_text("ok\n")
    (root / "step_latest").mkdir()
    (root / "step_latest" / MARKER).write_text("ok\n")
    (root / "step_000013").write_text("a file")
    assert names(tmp_path) == ["step_000009", "step_000010", "step_1000000"]
    assert load_latest(tmp_path, warn=pytest.fail).step == 1_000_000


def test_keep_last_prunes_the_oldest(tmp_path, trained):
    for step in range(1, 6):
        save(tmp_path, step, trained, keep_last=2)
    assert names(tmp_path) == ["step_000004", "step_000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000005"]


def test_failed_write_leaves_nothing_and_keeps_the_previous(tmp_path, trained, monkeypatch):
    save(tmp_path, 2, trained)
    model, tok, optimizer = trained

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 4, trained)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert load_latest(tmp_path, warn=pytest.fail).step == 2


def test_resaving_a_step_replaces_it(tmp_path, trained):
    save(tmp_path, 4, trained, marker="old")
    (step_dir(tmp_path, 4) / "stray.txt").write_text("from the first write")
    save(tmp_path, 4, trained, marker="new")
    assert not (step_dir(tmp_path, 4) / "stray.txt").exists()
    assert read_checkpoint(step_dir(tmp_path, 4)).state["marker"] == "new"


def test_a_resave_killed_while_deleting_the_old_copy_leaves_no_complete_looking_half(
    tmp_path, trained, monkeypatch
):
    save(tmp_path, 2, trained)
    save(tmp_path, 4, trained)
    real_rmtree = shutil.rmtree

    def dies_midway(path, *args, **kwargs):  # the process is killed after rmtree removed one file
        if Path(path) == step_dir(tmp_path, 4):
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4, trained)
    monkeypatch.undo()
    assert names(tmp_path) == ["step_000002"]
    assert load_latest(tmp_path, warn=pytest.fail).step == 2


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "weights truncated": lambda d: truncate(d / "model.safetensors"),
    "weights missing": lambda d: (d / "model.safetensors").unlink(),
    "optimizer truncated": lambda d: truncate(d / "optimizer.pt"),
    "rng garbage": lambda d: (d / "rng.pt").write_bytes(b"\x00not a torch file"),
    "state garbage": lambda d: (d / "trainer_state.json").write_text("{"),
    "state missing": lambda d: (d / "trainer_state.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, trained, damage):
    for step in (2, 4, 6):
        save(tmp_path, step, trained)
    DAMAGE[damage](step_dir(tmp_path, 6))
    warnings: list[str] = []
    restored = load_latest(tmp_path, warn=warnings.append)
    assert restored.step == 4 and restored.path == step_dir(tmp_path, 4)
    assert len(warnings) == 1 and "step_000006 is unreadable" in warnings[0]


def test_every_checkpoint_damaged_or_none_at_all_is_a_user_error(tmp_path, trained):
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_latest(tmp_path, warn=pytest.fail)
    for step in (1, 2):
        save(tmp_path, step, trained)
        truncate(step_dir(tmp_path, step) / "optimizer.pt")
    warnings: list[str] = []
    with pytest.raises(UserError, match="every checkpoint .* is unreadable"):
        load_latest(tmp_path, warn=warnings.append)
    assert len(warnings) == 2


def test_checkpoint_is_a_hugging_face_directory(tmp_path, trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save(tmp_path, 3, trained)
    model, tok, _ = trained
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    ids = torch.tensor([[5, 9, 13, 2]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (
        AutoTokenizer.from_pretrained(path, local_files_only=True)("2+3=")["input_ids"]
        == tok("2+3=")["input_ids"]
    )
    state = json.loads((path / "trainer_state.json").read_text())
    assert state == {"data_position": 12, "step": 3}
