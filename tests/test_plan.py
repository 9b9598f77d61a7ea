"""`--dry-run` (stableopd/stages/plan.py), the cross-field rules checked when a config loads, and model config overrides.

- Every example file's own first-line command, with `--dry-run`, offline and with an empty model cache, exits
  0 without building, downloading or writing anything; the paper commands reach their 8-process vLLM plan.
- The paper student's published config (Qwen2.5-Math-1.5B's config.json) gives its published size and a
  memory plan; without the example's context overrides the plan warns that 8192 new tokens do not fit.
- Each kind of bad combination exits 2 with one line naming the keys, before any model is built or loaded.
- `student.config_overrides` reach the loaded model (rotary frequencies, logits), every checkpoint, and a
  run that resumes from one.

    pytest tests/test_plan.py
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stableopd.cli import app

EXAMPLES = sorted(Path("examples").glob("*.yaml"))

# Qwen/Qwen2.5-Math-1.5B's config.json as published (architecture keys; the model card says 1.54B parameters)
QWEN_MATH_15B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "max_window_layers": 21, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "sliding_window": 4096,
    "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936, "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16", "attention_dropout": 0.0,
}  # fmt: skip


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No hub, and an empty model cache: a dry run that builds a built-in would fill it."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STABLEOPD_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def first_line_command(path: Path) -> list[str]:
    line = path.read_text().splitlines()[0]
    assert line.startswith("# stableopd "), f"{path} does not open with its command"
    return shlex.split(line.removeprefix("# stableopd "))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_command_passes_dry_run_offline(example, offline, tmp_path, monkeypatch):
    args = first_line_command(example)
    monkeypatch.chdir(tmp_path)  # a run directory written by mistake would appear here
    (tmp_path / "examples").symlink_to(Path(__file__).resolve().parents[1] / "examples")
    result = invoke([*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("plan: stableopd ") and "ready to launch" in out.splitlines()[-1]
    assert list(offline.iterdir()) == [] and not (tmp_path / "runs").exists()  # nothing built or written
    if example.stem.startswith("paper-"):
        assert "processes     8 (global batch 64 prompts, 8 per rank)" in out
        assert (
            "vllm backend" in out and "vllm (pip install" in out
        )  # not installed here: listed, not an error


def test_paper_student_config_gives_its_size_a_memory_plan_and_a_context_check(offline, tmp_path):
    student = tmp_path / "qwen-math-1.5b"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(QWEN_MATH_15B))
    base = [
        "distill",
        "-c",
        "examples/paper-qwen-math-1.5b.yaml",
        "--nproc",
        "8",
        "--dry-run",
        "--student",
        str(student),
        "--out",
        str(tmp_path / "run"),
    ]
    result = invoke(base)
    assert result.exit_code == 0, result.output
    size = next(line for line in result.output.splitlines() if "student size" in line)
    millions = float(size.split()[2].removesuffix("M").replace(",", ""))
    assert 1530 < millions < 1550, size  # the model card's 1.54B
    assert "memory plan per rank (8 processes):" in result.output and "warning" not in result.output
    assert "student gathered for sampling" not in result.output  # vLLM samples from its own copy
    params_row = next(
        line for line in result.output.splitlines() if "student params (sharded)" in line
    ).split()
    unit = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[params_row[-1]]
    # bf16 weights (2 bytes each), sharded over 8 ranks
    assert float(params_row[-2]) * unit == pytest.approx(millions * 1e6 * 2 / 8, rel=0.01), params_row
    bare = invoke([*base, "-s", "student.config_overrides={}"])
    assert bare.exit_code == 0
    assert "the student's context is 4,096 tokens" in bare.output  # 1024 + 8192 would not fit


def test_config_overrides_key_the_model_does_not_have_is_refused_in_the_dry_run(offline, tmp_path):
    student = tmp_path / "m"
    student.mkdir()
    (student / "config.json").write_text(json.dumps(QWEN_MATH_15B))
    result = invoke(
        [
            "distill",
            "-c",
            "examples/paper-qwen-math-1.5b.yaml",
            "--dry-run",
            "--student",
            str(student),
            "-s",
            "student.config_overrides={rope_thetta: 1}",
            "-s",
            "train.prompts_per_step=8",
        ]
    )
    assert result.exit_code == 2
    assert (
        "student.config_overrides.rope_thetta: the model's config (Qwen2Config) has no 'rope_thetta'"
        in result.output
    )


# (overrides, --nproc, fragments the one-line error must hold)
BAD = [
    (["loss.objective=jsd", "teacher.engine=vllm"], 1, ["loss.objective=jsd", "teacher.engine=vllm"]),
    (["loss.teacher_temperature=0.5", "teacher.engine=vllm"], 1, ["loss.teacher_temperature", "teacher.engine=vllm"]),
    (["teacher.engine_options={max_model_len: 64}"], 1, ["teacher.engine_options", "teacher.engine=hf"]),
    (["sampling.backend=vllm", "sampling.temperature=2.5"], 1, ["sampling.temperature=2.5", "sampling.backend=vllm"]),
    (["sampling.backend=vllm", "sampling.options={max_model_len: 512}", "sampling.max_new_tokens=64"], 1,
     ["sampling.options.max_model_len=512", "data.max_prompt_tokens", "sampling.max_new_tokens"]),
    (["sampling.backend=vllm", "teacher.engine=vllm", "sampling.options={gpu_memory_utilization: 0.6}",
      "teacher.engine_options={gpu_memory_utilization: 0.5}"], 1,
     ["sampling.options.gpu_memory_utilization", "teacher.engine_options.gpu_memory_utilization"]),
    (["student.config_overrides={max_position_embeddings: 512}"], 1,
     ["student.config_overrides.max_position_embeddings", "data.max_prompt_tokens", "sampling.max_new_tokens"]),
    (["train.prompts_per_step=3"], 2, ["train.prompts_per_step=3", "2 processes"]),
    (["sampling.backend=vllm", "sampling.options={tensor_parallel_size: 2}"], 2,
     ["sampling.options.tensor_parallel_size=2", "2 processes"]),
    (["sampling.backend=vllm", "teacher.engine=vllm", "sampling.options={gpu_memory_utilization: 0.4}",
      "teacher.engine_options={gpu_memory_utilization: 0.4}"], 2, ["sampling.backend=vllm", "teacher.engine=vllm"]),
    (["student.lora={r: 4}"], 2, ["student.lora", "one process"]),
    (["sampling.backend=my_plugin"], 2, ["sampling.backend=my_plugin", "multi-process"]),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "nproc", "fragments"), BAD, ids=[" ".join(b[0]) + f" x{b[1]}" for b in BAD])
def test_bad_combination_exits_2_naming_the_keys_before_any_model_loads(
    sets, nproc, fragments, offline, tmp_path
):
    args = ["distill", "-c", "examples/smoke.yaml", "--out", str(tmp_path / "run"), "--nproc", str(nproc)]
    for dry in ([], ["--dry-run"]):
        result = invoke([*args, *[a for s in sets for a in ("-s", s)], *dry])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert all(f in lines[0] for f in fragments), (lines[0], fragments)
        assert (
            list(offline.iterdir()) == [] and not (tmp_path / "run").exists()
        )  # no model built, nothing written


def test_vllm_sampler_and_teacher_engine_are_accepted_under_several_processes(offline, tmp_path):
    for sets in (["sampling.backend=vllm"], ["teacher.engine=vllm"]):
        result = invoke(
            [
                "distill",
                "-c",
                "examples/smoke.yaml",
                "--nproc",
                "2",
                "--dry-run",
                "--out",
                str(tmp_path / "run"),
                *[a for s in sets for a in ("-s", s)],
            ]
        )
        assert result.exit_code == 0, result.output
        assert "processes     2" in result.output


def test_removed_train_dtype_names_the_keys_that_replace_it():
    result = invoke(["distill", "-c", "examples/smoke.yaml", "-s", "train.dtype=bfloat16", "--dry-run"])
    assert result.exit_code == 2
    assert "config key 'train.dtype' does not exist" in result.output and "student.dtype" in result.output


def test_config_overrides_reach_the_model_every_checkpoint_and_a_resumed_run(tmp_path):
    from stableopd.config import load_config
    from stableopd.models.loading import load_model
    from stableopd.stages.distill import run_distill

    plain, over = (
        load_model("tiny"),
        load_model("tiny", config_overrides={"rope_theta": 300000.0, "max_position_embeddings": 4096}),
    )
    assert over.model.config.rope_parameters["rope_theta"] == 300000.0
    assert over.model.config.max_position_embeddings == 4096 != plain.model.config.max_position_embeddings
    # the rotary frequencies follow theta: inv_freq = theta ** (-2i / head_dim), so the last one shrinks
    ratio = over.model.model.rotary_emb.inv_freq[-1] / plain.model.model.rotary_emb.inv_freq[-1]
    head_dim = plain.model.config.hidden_size // plain.model.config.num_attention_heads
    assert float(ratio) == pytest.approx((10000.0 / 300000.0) ** ((head_dim - 2) / head_dim), rel=1e-5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert not torch.allclose(plain.model(ids).logits, over.model(ids).logits)  # the weights are the same
    sets = [
        "train.steps=2",
        "train.save_every=1",
        "train.eval_every=0",
        "logging.progress=false",
        "student.config_overrides={rope_theta: 300000.0, max_position_embeddings: 4096}",
    ]
    run = tmp_path / "run"
    assert run_distill(load_config("examples/smoke.yaml", sets + ["train.steps=1"], {"out": str(run)})) == 0
    assert run_distill(load_config("examples/smoke.yaml", sets, {"out": str(run)}), resume=True) == 0
    for step in (1, 2):
        saved = json.loads((run / f"checkpoints/step_{step:06d}/config.json").read_text())
        assert saved["rope_parameters"]["rope_theta"] == 300000.0 and saved["max_position_embeddings"] == 4096
    from stableopd.errors import UserError

    typo = load_config(
        "examples/smoke.yaml", ["teacher.config_overrides={rope_thetta: 1}"], {"out": str(tmp_path / "typo")}
    )
    with pytest.raises(UserError, match=r"^teacher.config_overrides.rope_thetta: the model's config"):
        run_distill(typo)


def test_sft_dry_run_counts_golden_solutions_and_the_run_directory_rules(offline, tmp_path):
    ok = invoke(
        [
            "sft",
            "--student",
            "tiny",
            "--data",
            "builtin:arith?digits=1&n=20",
            "--out",
            str(tmp_path / "s"),
            "--dry-run",
        ]
    )
    assert ok.exit_code == 0, ok.output
    assert "objective     SFT on golden solutions" in ok.output and "20 with a golden solution" in ok.output
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"id": "a", "prompt": "1+1=", "answer": "2"}\n')
    none = invoke(
        ["sft", "--student", "tiny", "--data", str(bare), "--out", str(tmp_path / "s"), "--dry-run"]
    )
    assert none.exit_code == 2 and "sft needs golden solutions" in none.output
    resume = invoke(["sft", "--student", "tiny", "--out", str(tmp_path / "s"), "--dry-run", "--resume"])
    assert resume.exit_code == 2 and "no complete checkpoint to resume from" in resume.output
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "metrics.jsonl").write_text("{}\n")
    taken = invoke(["sft", "--student", "tiny", "--out", str(tmp_path / "s"), "--dry-run"])
    assert (
        taken.exit_code == 2 and "stopped before its first checkpoint" in taken.output
    )  # as the real run says


def test_lora_dry_run_counts_only_the_adapter_as_trained(offline, tmp_path):
    from stableopd.models.loading import resolve_model_path

    student = resolve_model_path("tiny")  # the built-in, built into this test's cache beforehand
    result = invoke(
        [
            "distill",
            "-c",
            "examples/smoke.yaml",
            "--student",
            student,
            "-s",
            "student.lora={r: 4}",
            "--out",
            str(tmp_path / "run"),
            "--dry-run",
        ]
    )
    assert result.exit_code == 0, result.output
    # tiny: d=64, 2 layers, q/o 64->64, k/v 64->32, gate/up 64->128, down 128->64; LoRA adds r * (in + out) each
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert f"({2 * per_layer:,} trained)" in result.output
    assert "reference     the student with its LoRA adapter off" in result.output
