"""The toy models' shipped weights: they are what the recipes build, they install on first use, and a
damaged, stale or unwanted file is never used.

The rebuild tests build every recipe again (minutes; conftest starts them in the background) on one thread
with torch's AVX2 kernels, as tools/ship_toy_weights.py did, and compare every file byte for byte with an
install of the shipped weights.

    pytest tests/test_shipped_models.py
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stableopd.models import toy
from stableopd.models.loading import built_dir, resolve_model_path
from tools.ship_toy_weights import BUILD, CAPABILITY, build_env

NAMES = list(toy.TOY_FAMILY)


def files(path: Path) -> dict[str, bytes]:
    """Every file a build or an install writes, except the build log (it records how the weights came)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "toy_build.json"}


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_has_shipped_weights_for_its_current_key(name):
    entry = toy.shipped_manifest()[name]
    assert entry["recipe_key"] == toy.recipe_key(
        toy.TOY_FAMILY[name]
    )  # else: python tools/ship_toy_weights.py
    assert toy.file_sha256(toy.SHIPPED / f"{name}.safetensors") == entry["sha256"]
    assert toy.shipped_weights(name) == toy.SHIPPED / f"{name}.safetensors"


def test_first_use_installs_the_shipped_weights_without_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STABLEOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(toy, "train_on_golden", lambda *a, **k: pytest.fail("trained instead of installing"))
    path = Path(resolve_model_path("collapse-student"))  # its base, arith-student, is not needed
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")) == [
        path.name
    ]
    assert toy.file_sha256(path / "model.safetensors") == toy.shipped_manifest()["collapse-student"]["sha256"]
    info = json.loads((path / "toy_build.json").read_text())
    assert info["source"] == "shipped" and info["cpu_capability"] == CAPABILITY.upper()
    err = " ".join(capsys.readouterr().err.split())
    assert "installed collapse-student: weights shipped with stableopd, built by its recipe" in err


def test_damaged_stale_or_unwanted_shipped_weights_are_not_used(monkeypatch, tmp_path):
    shipped = tmp_path / "toy_weights"
    shutil.copytree(toy.SHIPPED, shipped)
    monkeypatch.setattr(toy, "SHIPPED", shipped)
    assert toy.shipped_weights("arith-student") == shipped / "arith-student.safetensors"
    monkeypatch.setenv("STABLEOPD_BUILD_TOYS", "1")
    assert toy.shipped_weights("arith-student") is None  # the user asked for a build
    monkeypatch.delenv("STABLEOPD_BUILD_TOYS")
    recipe = toy.TOY_FAMILY["arith-student"]
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-student", dataclasses.replace(recipe, steps=recipe.steps + 1))
    assert toy.shipped_weights("arith-student") is None  # a changed recipe
    monkeypatch.setitem(toy.TOY_FAMILY, "arith-student", recipe)
    data = bytearray((shipped / "arith-student.safetensors").read_bytes())
    data[-1] ^= 1
    (shipped / "arith-student.safetensors").write_bytes(bytes(data))
    assert toy.shipped_weights("arith-student") is None  # one flipped bit
    (shipped / "arith-student.safetensors").unlink()
    assert toy.shipped_weights("arith-student") is None
    assert toy.shipped_weights("tiny") is None  # not a toy recipe


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_recipe_rebuilds_the_shipped_weights_bit_for_bit(name, rebuild_cache, tmp_path, monkeypatch):
    out = subprocess.run(
        [sys.executable, "-c", BUILD, name], env=build_env(rebuild_cache), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    built = Path(json.loads(out.stdout.splitlines()[-1])[0])
    info = json.loads((built / "toy_build.json").read_text())
    if info["cpu_capability"] != CAPABILITY.upper():
        pytest.skip(
            f"this CPU has no {CAPABILITY.upper()} kernels (built with {info['cpu_capability']}): the "
            "shipped weights are reproducible only with them"
        )
    assert "source" not in info  # trained here, from the recipe
    monkeypatch.setenv("STABLEOPD_CACHE", str(tmp_path))
    installed = Path(resolve_model_path(name))
    assert installed == built_dir(name) and installed.name == built.name
    assert files(built) == files(installed)
