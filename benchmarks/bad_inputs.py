"""Run every command against a matrix of bad inputs and print one row per case: exit code, first line.

Each case runs `python -m stableopd ...` in a fresh folder, offline, with the tiny built-in models, and the
table flags any case whose output holds a Python traceback (the promise: none without --debug) or whose
exit code is not the expected one (2 bad input, 130/143 a signal, 0 where the input is odd but fine).

    python benchmarks/bad_inputs.py [--jobs 2] [--only SUBSTRING] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TINY = [
    "-s",
    "train.prompts_per_step=2",
    "-s",
    "sampling.n=2",
    "-s",
    "sampling.max_new_tokens=8",
    "-s",
    "data.val_limit=2",
    "-s",
    "train.eval_every=0",
    "-s",
    "logging.progress=false",
]
ROWS = [
    {"id": f"q{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1), "solution": f"{2 * i + 1}"}
    for i in range(8)
]
RO = "/sys/stableopd-bad-inputs"  # refuses new files to every user, root included


@dataclass
class Case:
    group: str
    name: str
    args: list[str]
    setup: Callable[[Path], None] = lambda d: None
    expect: int = 2
    signal_after: tuple[int, str] | None = None  # (signal, file whose appearance triggers it)
    signals: int = 1
    env: dict[str, str] = field(default_factory=dict)


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)

    return setup


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


DATA = write("d.jsonl", jsonl(ROWS))


def mkfifo(name: str) -> Callable[[Path], None]:
    return lambda d: os.mkfifo(d / name)


def mkdir(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def tiny_copy(damage: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        import shutil

        from stableopd.models.loading import resolve_model_path

        src = Path(resolve_model_path("tiny"))
        dst = d / "m"
        shutil.copytree(src, dst)
        if damage == "no weights":
            (dst / "model.safetensors").unlink()
        elif damage == "cut weights":
            w = dst / "model.safetensors"
            w.write_bytes(w.read_bytes()[:5000])
        elif damage == "bad config":
            (dst / "config.json").write_text("{oops")
        elif damage == "unknown arch":
            cfg = json.loads((dst / "config.json").read_text())
            cfg["model_type"] = "no-such-arch"
            (dst / "config.json").write_text(json.dumps(cfg))
        elif damage == "tokenizer needs package":
            (dst / "tokenizer.json").unlink()
            (dst / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
            (dst / "tokenizer.model").write_bytes(b"\x00garbage")
        elif damage == "empty dir":
            for f in dst.iterdir():
                f.unlink()

    return setup


def distill(*extra: str) -> list[str]:
    return [
        "distill",
        "--student",
        "tiny",
        "--teacher",
        "tiny-teacher",
        "--data",
        "d.jsonl",
        "--out",
        "run",
        *TINY,
        *extra,
    ]


def trained_run(steps: int = 2) -> Callable[[Path], None]:
    """A finished 2-step run in ./run (checkpoints at 1 and 2)."""

    def setup(d: Path) -> None:
        DATA(d)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "stableopd",
                *distill("-s", f"train.steps={steps}", "-s", "train.save_every=1"),
            ],
            cwd=d,
            check=True,
            capture_output=True,
            timeout=300,
        )

    return setup


def damage_checkpoint(step: int, name: str, how: str, *, all_steps: bool = False) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        trained_run()(d)
        for s in [1, 2] if all_steps else [step]:
            p = d / "run" / "checkpoints" / f"step_{s:06d}" / name
            data = bytearray(p.read_bytes())
            if how == "cut":
                data = data[: len(data) // 2]
            elif how == "flip":
                data[len(data) // 2] ^= 0xFF
            elif how == "delete":
                p.unlink()
                continue
            p.write_bytes(bytes(data))

    return setup


def cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    r = [
        "rollout",
        "--model",
        "tiny",
        "--data",
        "d.jsonl",
        "-s",
        "sampling.max_new_tokens=4",
        "-s",
        "data.limit=2",
    ]
    # ---- config files
    for name, setup, args in [
        ("missing config", lambda d: None, ["-c", "nope.yaml"]),
        ("config is a directory", mkdir("c.yaml"), ["-c", "c.yaml"]),
        ("config is /dev/zero", lambda d: None, ["-c", "/dev/zero"]),
        ("config is a pipe", mkfifo("c.yaml"), ["-c", "c.yaml"]),
        (
            "config latin-1",
            write("c.yaml", "data:\n  system_prompt: r\xe9ponds\n".encode("latin-1")),
            ["-c", "c.yaml"],
        ),
        ("config UTF-16", write("c.yaml", "train:\n  steps: 3\n".encode("utf-16")), ["-c", "c.yaml"]),
        ("config binary", write("c.yaml", bytes(range(256)) * 4), ["-c", "c.yaml"]),
        ("config 5 MB", write("c.yaml", "#" * (5 << 20)), ["-c", "c.yaml"]),
        ("config bad YAML", write("c.yaml", "train: [1, 2\n"), ["-c", "c.yaml"]),
        ("config a list", write("c.yaml", "- a\n- b\n"), ["-c", "c.yaml"]),
        ("config nested 10k deep", write("c.yaml", "a: " + "[" * 10000 + "]" * 10000), ["-c", "c.yaml"]),
        (
            "config python tag",
            write("c.yaml", "out: !!python/object/apply:os.system ['true']\n"),
            ["-c", "c.yaml"],
        ),
        ("config unknown section", write("c.yaml", "trainer:\n  steps: 3\n"), ["-c", "c.yaml"]),
        ("config section is a number", write("c.yaml", "train: 5\n"), ["-c", "c.yaml"]),
    ]:
        add(Case("config", name, [*r, *args], both(DATA, setup)))
    for kv in [
        "sampling.temperature=nan",
        "sampling.temperature=.inf",
        "sampling.temperature=-1",
        "sampling.temperature=0.0000000001",
        "sampling.temperature=1e9",
        "sampling.top_p=0",
        "sampling.top_p=nan",
        "sampling.top_k=-1",
        "sampling.top_k=99999999999999999999",
        "sampling.max_new_tokens=0",
        "sampling.max_new_tokens=100000000000000000000",
        "sampling.n=1000000000000",
        "sampling.seed=-5",
        "sampling.seed=1e400",
        "train.seed=18446744073709551616",
        "data.seed=abc",
        "train.lr=nan",
        "train.lr=1e300",
        "train.steps=0",
        "train.steps=99999999999999",
        "train.micro_batch=0",
        "train.prompts_per_step=-3",
        "train.dist_timeout_s=1e300",
        "loss.jsd_beta=2",
        "loss.ref_kl_coef=.nan",
        "loss.power_alpha=1e308",
        "loss.teacher_temperature=0",
        "loss.chunk_size=0",
        "data.max_prompt_tokens=1e30",
        "eval.pass_k=[0]",
        "eval.pass_k=[1e30]",
        "eval.temperature=-.inf",
        "diagnose.rep_ratio=0",
        "diagnose.inflation_window=1",
        "sampling.options={batch_size: -1}",
        "sampling.options={batch_size: 1e40}",
        "sampling.options={beams: 4}",
        "sampling.backend=sglang",
        "student.dtype=float8",
        "student.device=cuda",
        "student.device=banana",
        "out=",
        "sampling.n",
        "sampling..n=2",
        "sampling=3",
        "train.warmup_steps=500",
        "train.min_lr_ratio=0.5",
        "loss.reward_to_go=2",
        "teacher.mismatched_tokens=ignore",
        "student.engine=vllm",
        "logging.tensorboard=true",
        "logging.report_to=[neptune]",
        "logging.report_to=[wandb,wandb]",
        "student.lora.r=0",
        "student.lora.target_modules=[lm_head]",
        "student.lora.target_modules=[]",
        "teacher.lora.r=4",
        "student.lora=5",
        "train.dtype=bfloat16",
        "student.config_overrides=5",
        "student.config_overrides={max_position_embeddings: 16}",
        "teacher.engine_options={dtype: half}",
        "data.max_solution_tokens=0",
    ]:
        add(Case("config value", kv, [*r, "-s", kv], DATA))
    # ---- data
    for name, setup, src in [
        ("data missing", lambda d: None, "nope.jsonl"),
        ("data is a directory", mkdir("dd"), "dd"),
        ("data is /dev/zero", lambda d: None, "/dev/zero"),
        ("data is /dev/null", lambda d: None, "/dev/null"),
        ("data is a pipe", mkfifo("p.jsonl"), "p.jsonl"),
        ("data latin-1", write("x.jsonl", '{"prompt": "caf\xe9"}\n'.encode("latin-1")), "x.jsonl"),
        ("data binary", write("x.jsonl", bytes(range(256)) * 64), "x.jsonl"),
        ("data empty", write("x.jsonl", ""), "x.jsonl"),
        ("data blank lines only", write("x.jsonl", "\n\n\n"), "x.jsonl"),
        ("data bad JSON line", write("x.jsonl", '{"prompt": "a"}\n{oops}\n'), "x.jsonl"),
        ("data line is a list", write("x.jsonl", "[1, 2]\n"), "x.jsonl"),
        ("data no prompt field", write("x.jsonl", '{"question": "a"}\n'), "x.jsonl"),
        (
            "data duplicate ids",
            write("x.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n'),
            "x.jsonl",
        ),
        ("data 100 MB line", write("x.jsonl", '{"prompt": "' + "a" * (100 << 20) + '"}\n'), "x.jsonl"),
        ("data nested 100k deep", write("x.jsonl", "[" * 100000 + "]" * 100000 + "\n"), "x.jsonl"),
        ("data .json not a list", write("x.json", '{"rows": []}'), "x.json"),
        ("data .json invalid", write("x.json", "[{oops}]"), "x.json"),
        ("data .parquet garbage", write("x.parquet", b"PAR1garbagePAR1"), "x.parquet"),
        ("data unknown builtin", lambda d: None, "builtin:nope"),
        ("data builtin bad option", lambda d: None, "builtin:arith?digits=banana"),
        ("data hub name offline", lambda d: None, "someorg/somedataset"),
        ("data prompt too long", write("x.jsonl", '{"prompt": "' + "word " * 3000 + '"}\n'), "x.jsonl"),
    ]:
        add(
            Case(
                "data",
                name,
                ["rollout", "--model", "tiny", "--data", src, "-s", "sampling.max_new_tokens=4"],
                setup,
            )
        )
    add(
        Case(
            "data",
            "data.max_file_mb exceeded",
            [*r, "-s", "data.max_file_mb=1"],
            write("d.jsonl", jsonl(ROWS) + jsonl([{"prompt": "x" * (2 << 20)}])),
        )
    )
    # ---- models
    for name, setup, model in [
        ("unknown model name", lambda d: None, "tinyy"),
        ("hub id offline", lambda d: None, "someorg/somemodel"),
        ("model path missing", lambda d: None, "./nope"),
        ("model dir without config", mkdir("m"), "m"),
        ("model dir without weights", tiny_copy("no weights"), "m"),
        ("model weights cut short", tiny_copy("cut weights"), "m"),
        ("model config not JSON", tiny_copy("bad config"), "m"),
        ("model unknown architecture", tiny_copy("unknown arch"), "m"),
        ("tokenizer needs a package", tiny_copy("tokenizer needs package"), "m"),
        ("model dir emptied", tiny_copy("empty dir"), "m"),
        ("model is a plain file", write("m.bin", b"weights"), "m.bin"),
        ("gguf missing", lambda d: None, "x.gguf"),
        ("gguf garbage", write("x.gguf", b"GGUF" + b"\x00" * 100), "x.gguf"),
    ]:
        add(
            Case(
                "model",
                name,
                ["rollout", "--model", model, "--data", "d.jsonl", "-s", "sampling.max_new_tokens=4"],
                both(DATA, setup),
            )
        )
    add(Case("model", "incompatible teacher (smollm2)", distill("--teacher", "smollm2-135m"), DATA))
    add(
        Case(
            "model",
            "teacher dir without weights",
            distill("--teacher", "m"),
            both(DATA, tiny_copy("no weights")),
        )
    )
    add(
        Case("model", "teacher end token it does not have", distill("-s", "teacher.end_token=<|nope|>"), DATA)
    )
    add(
        Case(
            "model",
            "reward-to-go with the jsd objective",
            distill("-s", "loss.objective=jsd", "-s", "loss.reward_to_go=1"),
            DATA,
        )
    )
    add(
        Case(
            "model",
            "LoRA target module the model does not have",
            distill("-s", "student.lora.target_modules=[nope_proj]"),
            DATA,
        )
    )
    add(
        Case(
            "model",
            "config override the model lacks",
            distill("-s", "student.config_overrides={rope_thetta: 1}"),
            DATA,
        )
    )
    add(
        Case(
            "model",
            "dry run: vLLM sampler and teacher on 2 ranks",
            [
                *distill("-s", "sampling.backend=vllm", "-s", "teacher.engine=vllm"),
                "--nproc",
                "2",
                "--dry-run",
            ],
            DATA,
        )
    )
    add(Case("model", "dry run: --resume without a checkpoint", [*distill(), "--dry-run", "--resume"], DATA))
    add(
        Case(
            "data",
            "list solution, flags not a list",
            [*distill("-s", "data.solution_correct_field=ok")],
            write(
                "d.jsonl",
                jsonl([{**row, "solution": [row.get("solution") or "x"], "ok": True} for row in ROWS]),
            ),
        )
    )
    add(
        Case(
            "data",
            "list prompt field",
            ["rollout", "--model", "tiny", "--data", "x.jsonl"],
            write("x.jsonl", '{"prompt": ["a", "b"]}\n'),
        )
    )
    add(Case("model", "export of a folder that is not a run", ["export", "d.jsonl"], DATA))
    add(
        Case(
            "model",
            "export of a run with no checkpoint",
            ["export", "run", "--merge"],
            both(DATA, lambda d: (d / "run" / "checkpoints").mkdir(parents=True)),
        )
    )
    # ---- output paths
    add(Case("paths", "rollout --out is a directory", [*r, "--out", "o"], both(DATA, mkdir("o"))))
    add(Case("paths", "rollout --out read-only", [*r, "--out", f"{RO}/o.jsonl"], DATA))
    add(Case("paths", "rollout --out under a file", [*r, "--out", "d.jsonl/o.jsonl"], DATA))
    add(Case("paths", "distill --out is a file", [*distill(), "--out", "d.jsonl"], DATA))
    add(Case("paths", "distill --out read-only", [*distill(), "--out", RO], DATA))
    add(
        Case(
            "paths",
            "sft --out is a file",
            ["sft", "--student", "tiny", "--data", "d.jsonl", "--out", "d.jsonl"],
            DATA,
        )
    )
    add(
        Case(
            "paths",
            "sft --out read-only",
            ["sft", "--student", "tiny", "--data", "d.jsonl", "--out", RO],
            DATA,
        )
    )
    add(
        Case(
            "paths",
            "eval --out is a file",
            ["eval", "--model", "tiny", "--data", "d.jsonl", "--out", "d.jsonl"],
            DATA,
        )
    )
    add(
        Case(
            "paths",
            "eval --out read-only",
            ["eval", "--model", "tiny", "--data", "d.jsonl", "--out", RO],
            DATA,
        )
    )
    add(
        Case(
            "paths",
            "eval --out holds a samples.jsonl folder",
            ["eval", "--model", "tiny", "--data", "d.jsonl", "--out", "e"],
            both(DATA, mkdir("e/samples.jsonl")),
        )
    )
    add(
        Case(
            "paths",
            "diagnose --plots is a file",
            ["diagnose", "r.jsonl", "--plots", "r.jsonl"],
            write("r.jsonl", '{"response": "a b c"}\n'),
        )
    )
    add(
        Case(
            "paths",
            "diagnose --plots read-only",
            ["diagnose", "r.jsonl", "--plots", RO],
            write("r.jsonl", '{"response": "a b c"}\n'),
        )
    )
    add(Case("paths", "diagnose run dir read-only report", ["diagnose", "/sys"], lambda d: None))
    # ---- diagnose / eval inputs
    for name, setup, path in [
        ("diagnose missing path", lambda d: None, "nope"),
        ("diagnose /dev/zero", lambda d: None, "/dev/zero"),
        ("diagnose pipe", mkfifo("p.jsonl"), "p.jsonl"),
        ("diagnose empty file", write("x.jsonl", ""), "x.jsonl"),
        ("diagnose binary file", write("x.jsonl", bytes(range(256)) * 64), "x.jsonl"),
        ("diagnose UTF-16 file", write("x.jsonl", '{"response": "a"}\n'.encode("utf-16")), "x.jsonl"),
        ("diagnose no text field", write("x.jsonl", '{"output": "a"}\n'), "x.jsonl"),
        ("diagnose 100 MB line", write("x.jsonl", '{"response": "' + "a" * (100 << 20) + '"}\n'), "x.jsonl"),
        ("diagnose empty directory", mkdir("e"), "e"),
        ("diagnose metrics with no steps", write("x.jsonl", '{"loss/total": 1}\n'), "x.jsonl"),
    ]:
        add(Case("diagnose", name, ["diagnose", path], setup))
    add(
        Case(
            "diagnose",
            "diagnose latin-1 responses (read, warned)",
            ["diagnose", "x.jsonl"],
            write("x.jsonl", '{"response": "caf\xe9 ok"}\n'.encode("latin-1")),
            expect=0,
        )
    )
    add(
        Case(
            "diagnose",
            "compare with one bad path",
            ["diagnose", "x.jsonl", "nope"],
            write("x.jsonl", '{"response": "a"}\n'),
        )
    )
    for name, setup, extra in [
        ("eval --responses missing", DATA, ["--responses", "nope.jsonl"]),
        ("eval --responses is a directory", both(DATA, mkdir("rr")), ["--responses", "rr"]),
        (
            "eval --responses latin-1",
            both(DATA, write("rr.jsonl", '{"prompt_id": "q1", "response": "\xe9"}\n'.encode("latin-1"))),
            ["--responses", "rr.jsonl"],
        ),
        ("eval --responses empty", both(DATA, write("rr.jsonl", "")), ["--responses", "rr.jsonl"]),
        (
            "eval --responses and --model",
            both(DATA, write("rr.jsonl", "{}\n")),
            ["--responses", "rr.jsonl", "--model", "tiny"],
        ),
        ("eval pass_k > n", DATA, ["--model", "tiny", "-s", "eval.pass_k=[4]"]),
        ("eval unknown checker", DATA, ["--model", "tiny", "-s", "eval.checker=nope"]),
        ("eval unknown preset", DATA, ["--model", "tiny", "-s", "eval.preset=nope"]),
        ("eval --step missing", trained_run(), ["run", "--step", "99"]),
        ("eval run dir without checkpoints", both(DATA, mkdir("run2")), ["run2"]),
    ]:
        add(Case("eval", name, ["eval", "--data", "d.jsonl", *extra], setup))
    huge = "9" * 6000
    add(
        Case(
            "eval",
            "eval answers past the int digit limit",
            ["eval", "--data", "h.jsonl", "--responses", "hr.jsonl"],
            both(
                write("h.jsonl", jsonl([{"id": "a", "prompt": "p", "answer": huge}])),
                write("hr.jsonl", jsonl([{"prompt_id": "a", "response": f"\\boxed{{{huge}}}"}])),
            ),
            expect=0,
        )
    )
    # ---- run directories and checkpoints
    add(
        Case(
            "run dir",
            "distill into a finished run without --resume",
            distill("-s", "train.steps=2"),
            trained_run(),
        )
    )
    add(Case("run dir", "--resume with no checkpoint", distill("--resume"), both(DATA, mkdir("run"))))
    add(Case("run dir", "--resume, run dir is a file", distill("--resume"), both(DATA, write("run", "x"))))
    for name, how in [
        ("model.safetensors", "cut"),
        ("model.safetensors", "flip"),
        ("optimizer.pt", "cut"),
        ("optimizer.pt", "flip"),
        ("rng.pt", "flip"),
        ("trainer_state.json", "cut"),
        ("config.json", "flip"),
        ("tokenizer.json", "cut"),
        ("model.safetensors", "delete"),
        ("COMPLETE", "flip"),
    ]:
        add(
            Case(
                "checkpoint",
                f"latest {name} {how} -> falls back",
                distill("-s", "train.steps=3", "--resume"),
                damage_checkpoint(2, name, how),
                expect=0,
            )
        )
    add(
        Case(
            "checkpoint",
            "every checkpoint damaged",
            distill("-s", "train.steps=3", "--resume"),
            damage_checkpoint(2, "model.safetensors", "flip", all_steps=True),
        )
    )
    add(
        Case(
            "checkpoint",
            "metrics.jsonl cut mid-line",
            distill("-s", "train.steps=3", "--resume"),
            both(
                trained_run(),
                lambda d: (d / "run" / "metrics.jsonl").write_text(
                    (d / "run" / "metrics.jsonl").read_text()[:-30]
                ),
            ),
            expect=0,
        )
    )
    add(
        Case(
            "checkpoint",
            "run config.yaml garbage",
            distill("-s", "train.steps=3", "--resume"),
            both(trained_run(), write("run/config.yaml", b"\xff\xfe garbage")),
            expect=0,
        )
    )
    add(
        Case(
            "run dir",
            "second writer while a run holds the lock",
            distill("-s", "train.steps=2"),
            both(DATA, lambda d: hold_lock(d / "run")),
        )
    )
    # ---- signals
    add(
        Case(
            "signals",
            "SIGTERM while loading the models",
            distill("-s", "train.steps=40"),
            DATA,
            expect=143,
            signal_after=(signal.SIGTERM, "run/.lock"),
        )
    )
    add(
        Case(
            "signals",
            "SIGINT during distill",
            distill("-s", "train.steps=40"),
            DATA,
            expect=130,
            signal_after=(signal.SIGINT, "run/metrics.jsonl"),
        )
    )
    add(
        Case(
            "signals",
            "SIGTERM during distill",
            distill("-s", "train.steps=40"),
            DATA,
            expect=143,
            signal_after=(signal.SIGTERM, "run/metrics.jsonl"),
        )
    )
    add(
        Case(
            "signals",
            "two SIGINTs during distill (stop now)",  # steps of several seconds: the second lands in one
            distill(
                "-s",
                "train.steps=40",
                "-s",
                "sampling.max_new_tokens=600",
                "-s",
                "sampling.n=8",
                "-s",
                "train.prompts_per_step=8",
            ),
            DATA,
            expect=130,
            signal_after=(signal.SIGINT, "run/metrics.jsonl"),
            signals=2,
        )
    )
    add(
        Case(
            "signals",
            "SIGTERM during sft",
            [
                "sft",
                "--student",
                "tiny",
                "--data",
                "d.jsonl",
                "--out",
                "run",
                "-s",
                "train.steps=400",
                "-s",
                "train.eval_every=0",
                "-s",
                "logging.progress=false",
            ],
            DATA,
            expect=143,
            signal_after=(signal.SIGTERM, "run/metrics.jsonl"),
        )
    )
    add(
        Case(
            "signals",
            "SIGINT during rollout",
            [
                "rollout",
                "--model",
                "tiny",
                "--data",
                "builtin:arith",
                "-s",
                "data.limit=400",
                "-s",
                "sampling.max_new_tokens=64",
            ],
            lambda d: None,
            expect=130,
            signal_after=(signal.SIGINT, ""),
        )
    )
    return c


def hold_lock(run: Path) -> None:
    """Hold RUN/.lock from a background process for 120 s (the case's command must be refused)."""
    run.mkdir(parents=True, exist_ok=True)
    code = (
        f"import time; from stableopd.engine.runctl import RunLock; l = RunLock({str(run)!r}).acquire(); "
        "print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"


def first_line(text: str, *, last: bool = False) -> str:
    """The line that says how the command ended: its `error:` line if any, else the first (or last) line that
    is not a status line or a library's log."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if errors := [ln for ln in lines if ln.startswith("error:")]:
        return errors[0]
    lines = [ln for ln in lines if not ln.startswith(("loading ", "warning:", "[transformers]", "resuming"))]
    return (lines[-1] if last else lines[0]) if lines else ""


def run_case(case: Case, root: Path) -> tuple[Case, int, str, bool, float]:
    d = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    case.setup(d)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **case.env,
    }
    cmd = [sys.executable, "-m", "stableopd", *case.args]
    t0 = time.perf_counter()
    if case.signal_after is None:
        proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)
        out, code = proc.stderr + proc.stdout, proc.returncode
    else:
        sig, trigger = case.signal_after
        p = subprocess.Popen(
            cmd,
            cwd=d,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # as from a terminal
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if (d / trigger).is_file() if trigger else time.perf_counter() - t0 > 8:
                for _ in range(case.signals):
                    p.send_signal(sig)
                    time.sleep(2.5)
                break
            time.sleep(0.05)
        so, se = p.communicate(timeout=300)
        return case, p.returncode, first_line(se, last=True), "Traceback" in se + so, time.perf_counter() - t0
    return case, code, first_line(out), "Traceback" in out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    todo = [c for c in cases() if a.only in c.name or a.only == c.group]
    root = Path(tempfile.mkdtemp(prefix="stableopd-bad-inputs-"))
    from stableopd.models.loading import resolve_model_path

    for name in ("tiny", "tiny-teacher"):
        resolve_model_path(name)
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda c: run_case(c, root), todo))
    bad = 0
    if a.markdown:
        print("| # | group | case | exit | first line |\n|---|---|---|---|---|")
    for i, (case, code, line, tb, secs) in enumerate(results, 1):
        ok = code == case.expect and not tb
        bad += not ok
        line = line.replace("|", "\\|")[:160]
        if a.markdown:
            print(f"| {i} | {case.group} | {case.name} | {code}{'' if ok else ' (!)'} | {line} |")
        else:
            print(f"{'ok ' if ok else 'BAD'} {code:>4} {secs:5.1f}s {case.group:12s} {case.name:45s} {line}")
    tracebacks = sum(tb for *_, tb, _ in results)
    print(f"\n{len(results)} cases, {tracebacks} with a traceback, {bad} not as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
