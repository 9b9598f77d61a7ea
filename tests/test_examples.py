"""Every shipped example config validates, and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stableopd.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_the_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.yaml", "smoke.yaml", "paper-qwen-math-1.5b.yaml", "paper-qwen-math-7b.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# stableopd ") and f"-c examples/{path.name}" in first
    assert cfg.out


def test_paper_configs_carry_the_paper_hyperparameters():
    for name in ("paper-qwen-math-1.5b.yaml", "paper-qwen-math-7b.yaml"):
        cfg = load_config(Path(EXAMPLES[0]).parent / name)
        assert (cfg.train.prompts_per_step, cfg.sampling.n, cfg.train.lr) == (64, 4, 1e-6)
        assert (cfg.loss.objective, cfg.loss.ref_kl_coef, cfg.loss.gold_coef) == ("stableopd", 0.01, 0.1)
        assert (cfg.sampling.temperature, cfg.sampling.max_new_tokens, cfg.sampling.backend) == (1.0, 8192, "vllm")
        assert (cfg.diagnose.rep_tail_chars, cfg.diagnose.rep_ratio, cfg.eval.temperature) == (10000, 10.0, 0.6)
