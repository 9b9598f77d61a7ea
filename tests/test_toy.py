"""The built-in toy models: deterministic builds, the cache, and builds that fail or are interrupted.

The real recipes take minutes, so every test swaps in a tiny recipe (one layer, a few SFT steps) through
the same TOY_FAMILY table that models.resolve_model_path reads.

    pytest tests/test_toy.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stableopd.engine import update
from stableopd.models import toy
from stableopd.models.loading import cache_dir, load_model, resolve_model_path
from stableopd.models.tiny import TinySpec

FAST = toy.ToyRecipe(
    spec=TinySpec(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab_rows=128, seed=3),
    steps=3, lr=1e-2, prompts_per_step=4, warmup=1, data="builtin:arith?digits=2&ops=+&n=32", limit=16,
)  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def fast_family(monkeypatch, tmp_path):
    """Both toy names get the FAST recipe; a fresh cache; calls to train_on_golden are counted."""
    monkeypatch.setenv("STABLEOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-student", FAST)
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-teacher", dataclasses.replace(FAST, steps=4))
    calls = []
    real = toy.train_on_golden

    def counted(*args, **kwargs):
        calls.append(kwargs.get("label"))
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "train_on_golden", counted)
    return calls


def test_same_recipe_same_weights_and_training_changes_them(tmp_path):
    a = weights(toy.build_toy_model("x", tmp_path / "a", recipe=FAST, progress=False))
    b = weights(toy.build_toy_model("x", tmp_path / "b", recipe=FAST, progress=False))
    assert same(a, b)
    other_seed = dataclasses.replace(FAST, spec=dataclasses.replace(FAST.spec, seed=4))
    assert not same(a, weights(toy.build_toy_model("x", tmp_path / "c", recipe=other_seed, progress=False)))
    other_order = dataclasses.replace(FAST, data_seed=1)
    assert not same(a, weights(toy.build_toy_model("x", tmp_path / "d", recipe=other_order, progress=False)))
    untrained = dataclasses.replace(FAST, steps=0)
    assert not same(a, weights(toy.build_toy_model("x", tmp_path / "e", recipe=untrained, progress=False)))


def test_the_build_runs_on_one_thread_and_restores_the_callers_count(tmp_path, monkeypatch):
    # Float sums are ordered by the thread count: the real student recipe built with 2 threads ends at
    # another SFT loss (0.096 vs 0.065) and another accuracy (10% vs 28%) than with 1. One thread makes
    # the cached model the same on every machine with the same torch build and CPU kernels.
    seen = []
    real = update.optimizer_step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "optimizer_step", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        toy.build_toy_model("x", tmp_path / "a", recipe=FAST, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1] * FAST.steps


def test_build_does_not_disturb_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    toy.build_toy_model("x", tmp_path / "a", recipe=FAST, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    r = dataclasses.replace(FAST, steps=100, warmup=10, lr=1.0, final_lr_frac=0.1)
    assert toy.lr_at(r, 1) == pytest.approx(0.1) and toy.lr_at(r, 10) == pytest.approx(1.0)
    assert toy.lr_at(r, 100) == pytest.approx(0.1)
    lrs = [toy.lr_at(r, s) for s in range(10, 101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone after warmup
    flat = dataclasses.replace(r, final_lr_frac=1.0)
    assert {toy.lr_at(flat, s) for s in range(10, 101)} == {1.0}


def test_first_load_builds_with_a_progress_bar_and_the_second_reuses_the_cache(fast_family, capsys):
    first = resolve_model_path("arith-student")
    assert fast_family == ["building arith-student (first use only)"]
    err = capsys.readouterr().err
    assert "building arith-student" in err  # the rich bar (and the final line) on stderr
    capability = torch.backends.cpu.get_cpu_capability()  # the kernels decide the rounding, so they are named
    assert f"with torch's {capability} kernels" in " ".join(err.split())
    assert resolve_model_path("arith-student") == first
    loaded = load_model("arith-student", dtype="float32", device="cpu")
    assert len(fast_family) == 1  # neither the second resolve nor load_model retrained
    assert loaded.model.config.hidden_size == FAST.spec.hidden_size
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.chat_template
    assert Path(first).parent == cache_dir() / "models"
    info = json.loads((Path(first) / "toy_build.json").read_text())
    assert info["cpu_capability"] == capability and info["torch"] == torch.__version__


def test_a_changed_recipe_is_a_new_cache_entry(fast_family, monkeypatch):
    first = resolve_model_path("arith-student")
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-student", dataclasses.replace(FAST, steps=2))
    second = resolve_model_path("arith-student")
    assert second != first and len(fast_family) == 2
    assert Path(first).is_dir()  # the old entry is left alone (another install may still use it)


@pytest.mark.parametrize(
    "failure", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_a_failed_build_leaves_nothing_that_would_be_picked(fast_family, monkeypatch, failure):
    real = update.optimizer_step
    seen = []

    def fail_on_third(*args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(update, "optimizer_step", fail_on_third)  # the build dies after two SFT steps
    with pytest.raises(type(failure)):
        resolve_model_path("arith-teacher")
    models = cache_dir() / "models"
    left = [p.name for p in models.iterdir() if not p.name.endswith(".lock")] if models.exists() else []
    assert left == []  # no entry and no temporary directory (the empty lock file may stay)
    monkeypatch.setattr(update, "optimizer_step", real)
    path = Path(resolve_model_path("arith-teacher"))  # the next use builds from scratch
    assert (path / "COMPLETE").exists() and len(fast_family) == 2
    ref = toy.build_toy_model(
        "x", path.parent.parent / "ref", recipe=toy.TOY_FAMILY["arith-teacher"], progress=False
    )
    assert same(weights(path), weights(ref))


def test_concurrent_first_uses_build_once_and_share_the_result(fast_family):
    import threading

    results, errors = [], []

    def use():
        try:
            results.append(resolve_model_path("arith-student"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and (Path(results[0]) / "COMPLETE").exists()
    assert len(fast_family) == 1  # one build; the others waited for it instead of building and replacing it


def test_a_half_built_entry_without_its_marker_is_rebuilt(fast_family):
    target = Path(resolve_model_path("arith-student"))
    (target / "COMPLETE").unlink()  # as if a copy stopped halfway
    (target / "model.safetensors").write_bytes(b"truncated")
    rebuilt = Path(resolve_model_path("arith-student"))
    assert rebuilt == target and (target / "COMPLETE").exists() and len(fast_family) == 2
    assert weights(rebuilt)  # a readable safetensors file again


def test_a_recipe_with_a_base_continues_from_the_bases_cached_weights(fast_family, monkeypatch):
    tuned = dataclasses.replace(FAST, base="arith-student", steps=2, data=FAST.data + "&checks=1")
    monkeypatch.setitem(toy.TOY_FAMILY, "collapse-student", tuned)
    base = weights(Path(resolve_model_path("arith-student")))
    path = Path(resolve_model_path("collapse-student"))
    assert fast_family == [
        f"building {name} (first use only)" for name in ("arith-student", "collapse-student")
    ]
    assert not same(base, weights(path))  # trained further
    # the same steps from the base's weights, by hand, give the same weights: the init was the base's
    by_hand = dataclasses.replace(tuned, base=None)
    start = load_model(resolve_model_path("arith-student"), device="cpu").model
    manual = toy.train_on_golden(
        start, load_model(str(path), device="cpu").tokenizer, by_hand, label="x", progress=False
    )
    assert manual and all(torch.equal(p, weights(path)[n]) for n, p in start.state_dict().items())


def test_a_changed_base_recipe_changes_the_derived_models_key(fast_family, monkeypatch):
    monkeypatch.setitem(toy.TOY_FAMILY, "collapse-student", dataclasses.replace(FAST, base="arith-student"))
    before = toy.recipe_key(toy.TOY_FAMILY["collapse-student"])
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-student", dataclasses.replace(FAST, steps=5))
    assert toy.recipe_key(toy.TOY_FAMILY["collapse-student"]) != before


def test_a_base_with_another_architecture_is_refused(fast_family, monkeypatch, tmp_path):
    wide_spec = dataclasses.replace(FAST.spec, hidden_size=32)
    wide = dataclasses.replace(FAST, base="arith-student", spec=wide_spec)
    with pytest.raises(ValueError, match="base arith-student has another architecture"):
        toy.build_toy_model("collapse-student", tmp_path / "x", recipe=wide, progress=False)


def test_a_changed_data_generator_changes_the_key(monkeypatch):
    from stableopd.data import arith

    recipe = dataclasses.replace(FAST, data=FAST.data + "&checks=1")
    before = toy.recipe_key(recipe)
    monkeypatch.setattr(arith, "CHECK_LINE", "Let me verify.")
    assert toy.recipe_key(recipe) != before
    assert toy.recipe_key(FAST) == toy.recipe_key(FAST)
