"""The command line: help, `rollout` end to end, and the one-line exit-2 errors users see."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stableopd.cli import app
from stableopd.models.loading import stop_token_ids
from tests.test_report import make_run

RECORD_FIELDS = {
    "prompt_id",
    "sample_idx",
    "prompt",
    "prompt_token_ids",
    "response",
    "response_token_ids",
    "sampler_logprobs",
    "n_tokens",
    "finish_reason",
    "truncated",
    "repetitive",
    "compression_ratio",
}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    *before, last = result.stderr.splitlines()
    assert last == f"error: {message}"
    assert all(line.startswith("loading ") for line in before), (
        before
    )  # only the status line of model loading
    assert "Traceback" not in result.output


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "stableopd", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for command in ("rollout", "distill", "eval", "diagnose"):
        assert any(line.strip("│ ").startswith(command + " ") for line in lines), command


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"stableopd {version('stableopd')} (torch ")


@pytest.mark.parametrize("command", ["distill", "sft", "eval", "diagnose"])
def test_flags_read_as_flags_in_help(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ --")}
    for flag in ("--resume", "--debug", "--json", "--strict"):
        if flag in lines:
            assert "<bool>" not in lines[flag], lines[flag]  # a flag takes no value
    assert "KEY=VALUE" in lines["--set"]


def test_models_lists_aliases():
    result = invoke("models")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    builtins = [
        "tiny",
        "tiny-teacher",
        "arith-teacher",
        "arith-student",
        "collapse-teacher",
        "collapse-student",
    ]
    assert names[:7] == [*builtins, "smollm2-135m"] and "qwen-1.5b" in names


# ------------------------------------------------------------------------------------------------
# rollout on the tiny model


def test_rollout_on_tiny_writes_complete_records(tmp_path, prompts_file, tiny):
    out = tmp_path / "x.jsonl"
    result = invoke(
        "rollout",
        "--model",
        "tiny",
        "--data",
        str(prompts_file),
        "-s",
        "sampling.n=2",
        "-s",
        "sampling.max_new_tokens=16",
        "-s",
        "data.shuffle=false",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert [(r["prompt_id"], r["sample_idx"]) for r in records] == [
        (pid, i) for pid in ("p-short", "p-long", "p-mid") for i in range(2)
    ]
    stop_ids = stop_token_ids(tiny.tokenizer, tiny.model)
    prompts = {json.loads(line)["id"]: json.loads(line) for line in prompts_file.read_text().splitlines()}
    for rec in records:
        assert RECORD_FIELDS <= rec.keys()
        assert rec["prompt"] == prompts[rec["prompt_id"]]["prompt"]
        assert rec.get("answer") == prompts[rec["prompt_id"]].get("answer")
        assert tiny.tokenizer.decode(rec["prompt_token_ids"]).endswith(
            rec["prompt"] + "<|im_end|>\n<|im_start|>assistant\n"
        )
        assert len(rec["response_token_ids"]) == rec["n_tokens"] == len(rec["sampler_logprobs"]) <= 16
        assert rec["finish_reason"] in ("stop", "length")
        assert rec["truncated"] == (rec["finish_reason"] == "length")
        assert rec["truncated"] == (rec["n_tokens"] == 16 and rec["stop_token_id"] is None)
        assert not set(rec["response_token_ids"]) & set(stop_ids)
        assert rec["response"] == tiny.tokenizer.decode(rec["response_token_ids"], skip_special_tokens=True)
        assert all(lp <= 0 for lp in rec["sampler_logprobs"])
        assert rec["repetitive"] is False  # 16 tokens are far below the default tail L = 10,000
        assert rec["compression_ratio"] > 0 or rec["response"] == ""
    (row,) = [line for line in result.stderr.splitlines() if line.startswith("│")]
    cells = [c.strip() for c in row.strip("│").split("│")]
    lengths = sorted(r["n_tokens"] for r in records)
    expected = [
        6,
        sum(lengths) / 6,
        lengths[3],
        lengths[5],
        lengths[5],
        sum(r["truncated"] for r in records) / 6,
        0,
    ]
    assert cells == [str(expected[0])] + [f"{float(v):.3g}" for v in expected[1:]]


def test_rollout_with_a_yaml_config_and_flags(tmp_path, prompts_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"student:\n  name: tiny-teacher\ndata:\n  source: {prompts_file}\n  limit: 1\n"
        "sampling:\n  n: 1\n  max_new_tokens: 4\nlogging:\n  progress: false\n"
    )
    out = tmp_path / "y.jsonl"
    assert invoke("rollout", "-c", str(cfg), "--out", str(out)).exit_code == 0
    assert len(read_jsonl(out)) == 1
    # --model beats the YAML file: tiny's vocabulary is the same, its sampler differs
    out2 = tmp_path / "z.jsonl"
    assert invoke("rollout", "-c", str(cfg), "--model", "tiny", "--out", str(out2)).exit_code == 0
    assert read_jsonl(out)[0]["sampler_logprobs"] != read_jsonl(out2)[0]["sampler_logprobs"]


# ------------------------------------------------------------------------------------------------
# rollout through a fake backend registered as a plugin: exact records


def test_rollout_through_a_plugin_backend(tmp_path, prompts_file, tiny, monkeypatch):
    (tmp_path / "fixed_backend.py").write_text(
        "from stableopd.backends.base import Sample\n"
        "class Fixed:\n"
        "    name = 'fixed'\n"
        "    def __init__(self, *, model, tokenizer, model_path, stop_ids, options):\n"
        "        self.tok, self.stop = tokenizer, stop_ids[0]\n"
        "    def generate(self, prompts_P, params):\n"
        "        ok = self.tok('ab', add_special_tokens=False)['input_ids']\n"
        "        loop = self.tok('xyz' * 10, add_special_tokens=False)['input_ids'][: params.max_new_tokens]\n"
        "        return [[Sample(ok + [self.stop], [-1.0, -2.0, -0.5], 'stop'),\n"
        "                 Sample(loop, [-0.1] * len(loop), 'length')] for _ in prompts_P]\n"
        "    def sync_weights(self, model):\n"
        "        pass\n"
    )
    info = tmp_path / "fixed_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fixed-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[stableopd.backends]\nfixed = fixed_backend:Fixed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fixed_backend", raising=False)
    out = tmp_path / "f.jsonl"
    result = invoke(
        "rollout",
        "--model",
        "tiny",
        "--data",
        str(prompts_file),
        "-s",
        "sampling.backend=fixed",
        "-s",
        "sampling.n=2",
        "-s",
        "sampling.max_new_tokens=12",
        "-s",
        "diagnose.rep_tail_chars=6",
        "-s",
        "diagnose.rep_ratio=0.1",
        "-s",
        "data.limit=1",
        "-s",
        "data.shuffle=false",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    stopped, looped = read_jsonl(out)
    eos = tiny.tokenizer.eos_token_id
    assert {
        k: stopped[k]
        for k in (
            "response",
            "n_tokens",
            "sampler_logprobs",
            "finish_reason",
            "truncated",
            "stop_token_id",
            "stop_logprob",
            "repetitive",
        )
    } == {
        "response": "ab",
        "n_tokens": 2,
        "sampler_logprobs": [-1.0, -2.0],
        "finish_reason": "stop",
        "truncated": False,
        "stop_token_id": eos,
        "stop_logprob": -0.5,
        "repetitive": False,  # 2 chars < L
    }
    assert {
        k: looped[k]
        for k in ("response", "n_tokens", "finish_reason", "truncated", "stop_token_id", "repetitive")
    } == {
        "response": "xyzxyzxyzxyz",
        "n_tokens": 12,
        "finish_reason": "length",
        "truncated": True,
        "stop_token_id": None,
        "repetitive": True,
    }
    import zlib

    tail = b"xyzxyz"
    assert looped["compression_ratio"] == round(len(tail) / len(zlib.compress(tail)), 4)


# ------------------------------------------------------------------------------------------------
# diagnose with several paths: one row per run, overlay plots, per-run config.yaml

SHORT_L = ["-s", "diagnose.rep_tail_chars=500"]  # make_run's responses are shorter than the default L


def table_row(output: str, name: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.startswith(f"{name} "))


def test_diagnose_one_path_keeps_the_single_run_report(tmp_path, monkeypatch):
    make_run(tmp_path / "run", collapse_at=80)
    monkeypatch.chdir(tmp_path)
    result = invoke("diagnose", str(tmp_path / "run"), "--json", *SHORT_L)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["verdict"] == "collapse" and "runs" not in payload and "name" not in payload
    assert (tmp_path / "run" / "report" / "diagnosis.json").is_file()
    assert not (tmp_path / "diagnose-compare").exists()


@pytest.mark.parametrize(("collapse_at", "code"), [(80, 1), (None, 0)])
def test_diagnose_several_runs_prints_a_row_each_and_strict_fails_on_any_unhealthy(
    tmp_path, monkeypatch, collapse_at, code
):
    make_run(tmp_path / "first", collapse_at=collapse_at)
    make_run(tmp_path / "second", collapse_at=None, seed=1)
    monkeypatch.chdir(tmp_path)  # the plots go to ./diagnose-compare by default
    result = invoke("diagnose", str(tmp_path / "first"), str(tmp_path / "second"), "--strict", *SHORT_L)
    assert result.exit_code == code, result.output
    first, second = table_row(result.output, "first"), table_row(result.output, "second")
    assert first[1] == ("collapse" if collapse_at else "healthy") and second[1:3] == ["healthy", "-"]
    assert (80 <= int(first[2]) <= 82) if collapse_at else first[2] == "-"
    assert "wrote diagnose-compare/truncation.png" in result.output
    assert (tmp_path / "diagnose-compare" / "truncation.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "first" / "report").exists()  # no single-run report per run


def test_diagnose_reads_each_run_with_its_own_config_yaml(tmp_path):
    from tests.test_diagnostics import write_rollouts, zlib_flag

    for name, tail in (("short_L", 500), ("long_L", 100_000)):
        steps = write_rollouts(tmp_path / name, n_steps=6, collapse_at=3)  # the same rollouts in both
        yaml = f"diagnose:\n  rep_tail_chars: {tail}\n  rep_ratio: 4.0\n"
        (tmp_path / name / "config.yaml").write_text(yaml)
    paths = [str(tmp_path / "short_L"), str(tmp_path / "long_L"), "--json", "--plots", str(tmp_path / "cmp")]
    result = invoke("diagnose", *paths)
    assert result.exit_code == 0, result.output
    rep = {r["name"]: r["final"]["rep_rate"] for r in json.loads(result.stdout)["runs"]}
    flags = [zlib_flag(r["response"], 500, 4.0) for r in steps[-1]]
    assert rep == {"short_L": pytest.approx(sum(flags) / len(flags)), "long_L": 0.0} and any(flags)
    # -s still applies to every run, over its config.yaml
    result = invoke("diagnose", *paths, "-s", "diagnose.rep_tail_chars=500")
    assert [r["final"]["rep_rate"] for r in json.loads(result.stdout)["runs"]] == [rep["short_L"]] * 2


def test_diagnose_tells_runs_with_the_same_folder_name_apart(tmp_path):
    make_run(tmp_path / "opd" / "run", collapse_at=80)
    make_run(tmp_path / "stableopd" / "run", collapse_at=None)
    out = tmp_path / "cmp"
    result = invoke("diagnose", str(tmp_path / "opd/run"), str(tmp_path / "stableopd/run"), "--json",
                    "--plots", str(out), *SHORT_L)  # fmt: skip
    payload = json.loads(result.stdout)
    named = [(r["name"], r["verdict"]) for r in payload["runs"]]
    assert named == [("opd/run", "collapse"), ("stableopd/run", "healthy")]
    assert sorted(Path(p).name for p in payload["report"]) == sorted(
        ["truncation.png", "repetition.png", "length.png", "accuracy.png", "advantage.png", "report.md",
         "comparison.json"]
    )  # fmt: skip
    md = (out / "report.md").read_text()
    assert "| opd/run | collapse |" in md and "| stableopd/run | healthy |" in md


def test_diagnose_bad_second_path_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    make_run(tmp_path / "good", collapse_at=None)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "typo"
    for plots in ([], ["--plots", str(tmp_path / "cmp")]):
        result = invoke("diagnose", str(tmp_path / "good"), str(missing), *plots)
        assert_one_line_error(
            result, f"{missing} does not exist: pass a run directory, a metrics.jsonl or a JSONL of responses"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["good"]
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["metrics.jsonl", "rollouts"]


# sysfs refuses new files to every user, root included (mode bits would not bind root)
READ_ONLY = Path("/sys/stableopd-test-output")


@pytest.mark.parametrize("paths", [1, 2])
@pytest.mark.parametrize("kind", ["under a file", "a file", "read-only"])
def test_diagnose_unwritable_plots_folder_is_one_line_before_reading(tmp_path, paths, kind):
    make_run(tmp_path / "a", collapse_at=None)
    make_run(tmp_path / "b", collapse_at=None, seed=1)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    plots = {"under a file": blocker / "plots", "a file": blocker, "read-only": READ_ONLY}[kind]
    result = invoke("diagnose", *[str(tmp_path / "a"), str(tmp_path / "b")][:paths], "--plots", str(plots))
    expected = {
        "under a file": f"plots folder '{plots}' cannot be created: '{blocker}' is a file",
        "a file": f"plots folder '{plots}' is a file, not a directory; pass a directory",
        "read-only": f"plots folder '{plots}' cannot be created: '/sys' is not writable (Permission denied)",
    }[kind]
    assert_one_line_error(result, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "blocker"]
    assert not (tmp_path / "a" / "report").exists()


@pytest.mark.parametrize(
    ("command", "dest", "expected"),
    [
        ("rollout", "dir", "rollout output '{dest}' is a directory; pass a file path"),
        (
            "rollout",
            "ro",
            "rollout output '{dest}' cannot be written: '/sys' is not writable (Permission denied)",
        ),
        ("rollout", "under file", "rollout output '{dest}' cannot be created: '{blocker}' is a file"),
        ("distill", "file", "run directory '{dest}' is a file, not a directory; pass a directory"),
        (
            "distill",
            "ro",
            "run directory '{dest}' cannot be created: '/sys' is not writable (Permission denied)",
        ),
        ("sft", "file", "run directory '{dest}' is a file, not a directory; pass a directory"),
        ("eval", "file", "eval output folder '{dest}' is a file, not a directory; pass a directory"),
        ("eval", "taken", "eval output '{dest}/samples.jsonl' is a directory; pass a file path"),
    ],
)
def test_output_paths_of_the_wrong_kind_fail_before_any_model_loads(
    tmp_path, prompts_file, monkeypatch, command, dest, expected
):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    path = {
        "dir": tmp_path,
        "ro": READ_ONLY / "out",
        "under file": blocker / "o.jsonl",
        "file": blocker,
        "taken": tmp_path / "evalout",
    }[dest]
    if dest == "taken":
        (path / "samples.jsonl").mkdir(parents=True)
    model = ["--student", "tiny"] if command in ("distill", "sft") else ["--model", "tiny"]
    result = invoke(command, *model, "--data", str(prompts_file), "--out", str(path))
    assert_one_line_error(result, expected.format(dest=path, blocker=blocker))


# ------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no traceback


def test_unknown_config_key(prompts_file):
    from stableopd.config import SamplingConfig

    result = invoke("rollout", "--data", str(prompts_file), "-s", "sampling.temprature=0.5")
    keys = ", ".join(SamplingConfig.model_fields)
    assert_one_line_error(result, f"unknown config key 'sampling.temprature'; valid keys here: {keys}")


def test_wrong_type(prompts_file):
    result = invoke("rollout", "--data", str(prompts_file), "-s", "sampling.n=two")
    assert_one_line_error(
        result,
        "config key 'sampling.n': Input should be a valid integer, unable to parse string as an integer "
        "(got 'two')",
    )


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(invoke("rollout", "--data", str(missing)), f"data file '{missing}' does not exist")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "c", prompt: "z"}\n')
    result = invoke("rollout", "--model", "tiny", "--data", str(data))
    assert_one_line_error(
        result,
        f"{data}:3: not valid JSON (Expecting property name enclosed in double quotes); fix or remove that line",
    )


def test_unknown_model_name(prompts_file, tmp_path):
    result = invoke(
        "rollout", "--model", "tinyy", "--data", str(prompts_file), "--out", str(tmp_path / "o.jsonl")
    )
    assert_one_line_error(
        result,
        "unknown model 'tinyy': use a Hugging Face id (org/name), a local path, or one of tiny, "
        "tiny-teacher, arith-teacher, arith-student, collapse-teacher, collapse-student, smollm2-135m, qwen-1.5b, qwen-7b, qwen-math-1.5b, qwen-math-7b, r1-distill-7b, openthinker3-7b",
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(invoke("rollout", "-c", str(missing)), f"config file '{missing}' does not exist")


def test_unknown_backend(prompts_file):
    result = invoke(
        "rollout", "--model", "tiny", "--data", str(prompts_file), "-s", "sampling.backend=sglang"
    )
    assert_one_line_error(
        result, "unknown sampling backend 'sglang'; available: fake, hf, vllm"
    )  # fake: the test plugin (conftest.py)


def test_incompatible_student_and_teacher_tokenizers(tmp_path, prompts_file):
    from test_models import permuted_tokenizer

    from stableopd.models.tiny import build_tiny_model

    teacher = build_tiny_model("tiny-teacher", tmp_path / "swapped-teacher")
    permuted_tokenizer().save_pretrained(teacher)
    result = invoke(
        "distill",
        "--student",
        "tiny",
        "--teacher",
        str(teacher),
        "--data",
        str(prompts_file),
        "--out",
        str(tmp_path / "run"),
        "-s",
        "train.steps=1",
    )
    assert_one_line_error(
        result,
        f"student 'tiny' and teacher '{teacher}' have different tokenizer vocabularies "
        "(101 vs 101 base tokens, 4 entries differ); pick models of the same family",
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_errors_are_one_line_in_a_real_process(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "stableopd", "rollout", "-c", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: config file '{missing}' does not exist\n"
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("rollout", "-c", str(tmp_path / "nope.yaml"), "--debug")
    from stableopd.errors import UserError

    assert isinstance(result.exception, UserError)


# ------------------------------------------------------------------------------------------------
# A real model


@pytest.mark.slow
def test_rollout_on_smollm2_writes_real_text(tmp_path, smollm2):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"id": "capital", "prompt": "What is the capital of France?"})
        + "\n"
        + json.dumps({"id": "count", "prompt": "Count from one to five."})
        + "\n"
    )
    out = tmp_path / "smol.jsonl"
    result = invoke(
        "rollout",
        "--model",
        "smollm2-135m",
        "--data",
        str(data),
        "-s",
        "sampling.n=1",
        "-s",
        "sampling.temperature=0",
        "-s",
        "sampling.max_new_tokens=12",
        "-s",
        "data.shuffle=false",
        "-s",
        "logging.progress=false",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    capital, count = read_jsonl(out)
    tok = smollm2.tokenizer
    for rec in (capital, count):
        assert RECORD_FIELDS <= rec.keys()
        assert tok.decode(rec["prompt_token_ids"]).startswith("<|im_start|>system\n")
        assert rec["n_tokens"] == len(rec["response_token_ids"]) == len(rec["sampler_logprobs"]) <= 12
        assert "<|im_end|>" not in rec["response"] and rec["response"].strip()
    # greedy SmolLM2-135M-Instruct answers this one correctly and stops on its own
    assert "Paris" in capital["response"] and capital["finish_reason"] == "stop"
    assert capital["response"].isascii() and len(capital["response"].split()) >= 3
    assert any(c.isdigit() or c.isalpha() for c in count["response"])


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (
            RuntimeError("kaboom\nmore detail"),
            1,
            "error: internal error: RuntimeError: kaboom; rerun with --debug for the traceback",
        ),
        (
            PermissionError(13, "Permission denied", "/runs/x/metrics.jsonl"),
            2,
            "error: permission denied: /runs/x/metrics.jsonl",
        ),
        (OSError(28, "No space left on device"), 2, "error: no space left on device"),
    ],
)
def test_whatever_escapes_a_command_is_one_line_and_debug_shows_it(monkeypatch, raised, code, line):
    import stableopd.diagnostics.report

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(stableopd.diagnostics.report, "run_diagnose", fail)
    result = invoke("diagnose", "anything.jsonl")
    assert result.exit_code == code and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [line] and "Traceback" not in result.output
    result = invoke("diagnose", "anything.jsonl", "--debug")
    assert result.exception is raised
