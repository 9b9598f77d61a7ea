"""Multi-process distill and sft (stableopd/engine/distributed.py): 2 processes with gloo on CPU against 1.

What is checked, and against what:
- 2 processes (torchrun) and 1 process on the same global batch, greedy sampling, 2 steps: the same rollouts,
  every step metric within 1e-5 relative (losses included; measured ~2e-7; the diag/* rounding probes within
  1e-5 absolute), final weights and Adam moments within what fp32 rounding of the summed gradients allows
  (`weight_tolerance`: derived per entry from the checkpoint's own Adam state, not from one CPU's results). Golden solutions are missing for some prompts, so ranks hold different
  numbers of them and the zero-weight padding micro-batches run; the validation prompts are split over ranks;
- the same with a tied-embedding student (as Qwen2.5-1.5B) and `train.shard_frozen=true` (teacher and
  reference FSDP-sharded too), for stableopd and for jsd with 2 passes per batch (the sharded teacher runs
  inside the update, and pi_old is scored on the gathered student) and gradient checkpointing;
- `stableopd sft --nproc 2` against 1 process: the same metrics, weights and Adam moments (same tolerances);
- a 2-process run launched with `--nproc 2` resumes from its step-1 checkpoint, and a 2-process checkpoint
  resumes in 1 process; both end where the uninterrupted 1-process run ends (same tolerances);
- `--nproc 2` with an odd global batch exits 2 with one line; a rank that raises makes the whole launch
  exit quickly (torchrun tears the group down; train.dist_timeout_s bounds any wait on a collective).

    pytest tests/test_distributed.py -s
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stableopd.engine.tracking import read_rows

COMMON = {
    "train.steps": 2, "train.prompts_per_step": 4, "sampling.n": 1, "sampling.temperature": 0,
    "sampling.max_new_tokens": 10, "train.micro_batch": 1, "train.eval_every": 2, "data.val_limit": 2,
    "train.save_every": 1, "logging.progress": "false", "train.dist_timeout_s": 60, "train.lr": 1e-3,
    "eval.temperature": 0,
}  # fmt: skip
REL = 1e-5  # step metrics, relative (measured ~2e-7)
# Two runs sum the same gradient terms in another order (two ranks, other CPU kernels), so their gradients
# differ by fp32 rounding: at most about n * u of the tensor's gradient scale, with u = 2**-24 and n up to a
# few hundred terms per sum here (tokens of the global batch, hidden and head widths), so GRAD_REL = 1e-4.
GRAD_REL = 1e-4
# Adam moments: m and v average gradients and squared gradients, so they differ by up to GRAD_REL and
# 2 * GRAD_REL of each tensor's largest entry.
# A Qwen-sized vocabulary puts 151,665 terms in every softmax sum: n * u = 151,665 * 2**-24 = 9.0e-3.
QWEN_GRAD_REL = 151_665 * 2**-24


def weight_tolerance(ckpt: Path, grad_rel: float = GRAD_REL) -> dict[str, torch.Tensor]:
    """Per-entry bound on the weight difference of two runs whose gradients differ by GRAD_REL of each tensor's
    gradient scale (`grad_rel`). Adam divides by sqrt(v_hat) + eps, so a gradient difference d moves an update by up to
    about 2 * lr * d / (sqrt(v_hat) + eps), and never by more than 2 * lr (the update is at most lr); summed
    over the steps taken. Entries whose gradient is near 0 are allowed up to 2 * lr a step: Adam turns their
    rounding into whole updates."""
    from transformers import AutoModelForCausalLM

    names = [n for n, p in AutoModelForCausalLM.from_pretrained(ckpt).named_parameters() if p.requires_grad]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    group = opt["param_groups"][0]
    lr, (_, beta2), eps = group["lr"], group["betas"], group["eps"]
    out = {}
    for i, name in enumerate(names):
        st = opt["state"][i]
        steps = float(st["step"])
        root = (st["exp_avg_sq"] / (1 - beta2**steps)).sqrt()  # |gradient| of each entry, bias-corrected
        per_step = (2 * grad_rel * root.max() / (root + eps)).clamp(max=2.0)
        out[name] = steps * lr * per_step
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(data: Path, run: Path, student: str = "tiny", teacher: str = "tiny-teacher", **over) -> list[str]:
    merged = {**COMMON, **{k.replace("__", "."): v for k, v in over.items()}}
    sets = [a for k, v in merged.items() for a in ("-s", f"{k}={v}")]
    return [
        "distill",
        "--student",
        student,
        "--teacher",
        teacher,
        "--data",
        str(data),
        "--out",
        str(run),
        *sets,
    ]


def launch(cli: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300):
    cmd = [sys.executable, "-m", "stableopd", *cli] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        "-m", "stableopd", *cli]  # fmt: skip
    import os

    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddata") / "train.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1),
             **({"solution": f"{i}+{i + 1}={2 * i + 1}"} if i % 3 else {})} for i in range(12)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    proc = launch(args(data, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def assert_same_run(a: Path, b: Path, grad_rel: float = GRAD_REL, rollouts: bool = True) -> None:
    rows_a, rows_b = read_rows(a / "metrics.jsonl"), read_rows(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        for k, v in ra.items():
            if k.startswith("time/") or not isinstance(v, float):
                assert k.startswith("time/") or v == rb[k], (ra["step"], k, v, rb[k])
                continue
            # diag/* measure float rounding between sampler and trainer themselves: compare them absolutely
            tol = {"abs": 1e-5} if k.startswith("diag/") else {"rel": REL, "abs": 1e-7}
            assert rb[k] == pytest.approx(v, **tol), (ra["step"], k, v, rb[k])
    for step in (1, 2) if rollouts else ():
        name = f"rollouts/step_{step:06d}.jsonl"
        ids = [
            [json.loads(line)["response_token_ids"] for line in (run / name).read_text().splitlines()]
            for run in (a, b)
        ]
        assert ids[0] == ids[1]
    ck_a, ck_b = a / "checkpoints/step_000002", b / "checkpoints/step_000002"
    wa, wb = load_file(ck_a / "model.safetensors"), load_file(ck_b / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    tol = weight_tolerance(ck_a, grad_rel)
    assert sorted(tol) == sorted(wa)
    worst = max(float(((wa[k] - wb[k]).abs() / tol[k]).max()) for k in wa)
    print(f"weights: largest difference {worst:.3g} of its tolerance")
    assert worst <= 1.0, worst
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ck_a, ck_b))
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    for i, st in oa["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            diff = float((st[key] - ob["state"][i][key]).abs().max())
            assert diff <= 2 * grad_rel * float(st[key].abs().max()) + 1e-12, (i, key)


def test_two_processes_match_one(data, single, tmp_path):
    run = tmp_path / "dp"
    t0 = time.perf_counter()
    proc = launch(args(data, run), nproc=2)
    print(f"2-process run: {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per rank (2 processes)" in proc.stderr + proc.stdout
    rows = read_rows(run / "metrics.jsonl")
    assert any(r.get("data/gold_missing") for r in rows)  # ranks held different numbers of golden solutions
    assert_same_run(single, run)
    assert len((run / "val/step_000002.jsonl").read_text().splitlines()) == 2


def test_sft_with_two_processes_matches_one(data, tmp_path):
    # sft runs on the same training stage: its golden solutions split over the ranks (2 of the 4 a step each),
    # gradients summed over global counts, validation prompts split, rank 0 writing consolidated checkpoints
    runs = {n: tmp_path / f"sft{n}" for n in (1, 2)}
    for n, run in runs.items():
        cli = ["sft", "--student", "tiny", "--data", str(data), "--out", str(run)]
        proc = launch([*cli, *(a for k, v in COMMON.items() for a in ("-s", f"{k}={v}")), "--nproc", str(n)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("memory plan per rank (2 processes)" in proc.stdout + proc.stderr) == (n == 2)
    rows = read_rows(runs[2] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["val/accuracy"] is not None
    assert not (runs[2] / "rollouts").exists()  # an sft step samples nothing
    assert_same_run(runs[1], runs[2], rollouts=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """The tiny student with tied input/output embeddings (as Qwen2.5-1.5B), saved as a local model."""
    from transformers import AutoModelForCausalLM

    from stableopd.models.tiny import build_tiny_model

    path = build_tiny_model("tiny", tmp_path_factory.mktemp("tied") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(path)
    return path


# jsd runs the sharded teacher inside the update; the second case also recomputes activations in backward
@pytest.mark.parametrize(
    "extra",
    [{}, {"loss__objective": "jsd", "train__epochs_per_batch": 2, "train__gradient_checkpointing": "true"}],
    ids=["stableopd", "jsd-2-epochs-checkpointing"],
)
def test_tied_student_and_sharded_teacher_and_reference_match_one_process(data, tied, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(args(data, one, student=str(tied), **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch(args(data, two, student=str(tied), train__shard_frozen="true", **extra), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher + reference (sharded)" in proc.stderr + proc.stdout
    assert_same_run(one, two)
    saved = load_file(two / "checkpoints/step_000002/model.safetensors")
    assert "lm_head.weight" not in saved  # still tied: one tensor, as transformers saves tied weights
    rows = read_rows(two / "metrics.jsonl")
    assert rows[-1]["loss/ref_kl"] > 0 and rows[-1]["val/reverse_kl"] > 0


def test_resume_two_processes_and_with_another_count(data, single, tmp_path):
    run = tmp_path / "dp"
    first = launch([*args(data, run, train__steps=1), "--nproc", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    other = tmp_path / "dp_to_1"
    import shutil

    shutil.copytree(run, other)
    resumed = launch([*args(data, run), "--resume", "--nproc", "2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(single, run)
    in_one = launch([*args(data, other), "--resume"])  # a 2-process checkpoint resumed by 1 process
    assert in_one.returncode == 0, in_one.stderr[-3000:]
    assert_same_run(single, other)


def test_batch_not_divisible_exits_2_with_one_line(data, tmp_path):
    proc = launch([*args(data, tmp_path / "r", train__prompts_per_step=3), "--nproc", "2"])
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "prompts_per_step=3" in lines[0] and "divisible" in lines[0], lines


def vllm_double_env(tmp_path: Path) -> dict[str, str]:
    """Subprocesses import tests/vllm_double.py as `vllm` (the double checks the external_launcher contract)."""
    import os

    shim = tmp_path / "shim" / "vllm"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "from tests.vllm_double import LLM, SamplingParams  # noqa: F401\n"
        "__version__ = '0.33.0-test-double'\n"
    )
    root = Path(__file__).resolve().parents[1]
    return {
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(root), os.environ.get("PYTHONPATH", "")])
    }


@pytest.mark.parametrize("option", ["sampling.backend=vllm", "teacher.engine=vllm"])
def test_vllm_on_every_rank_matches_one_process(data, tmp_path, option):
    """Each rank hosts its own engine (the double refuses one that is not an external_launcher replica) and
    samples or scores its share; the sampler's weights are pushed from the sharded student after each
    update, so step 2 samples from the trained weights (the sync check would stop the run otherwise)."""
    env = vllm_double_env(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    in_one = launch([*args(data, one), "-s", option], env=env)
    assert in_one.returncode == 0, in_one.stderr[-3000:]
    in_two = launch([*args(data, two), "-s", option], nproc=2, env=env)
    assert in_two.returncode == 0, in_two.stderr[-3000:]
    assert_same_run(one, two)
    if option.startswith("sampling"):
        rows = read_rows(two / "metrics.jsonl")
        assert rows[-1]["diag/kl_sample_train"] == pytest.approx(0.0, abs=1e-4)


def test_failing_rank_stops_the_others(data, tmp_path):
    t0 = time.perf_counter()
    proc = launch(args(data, tmp_path / "r"), nproc=2, env={"STABLEOPD_TEST_FAIL": "1:1"}, timeout=120)
    wall = time.perf_counter() - t0
    print(f"failing-rank launch ended in {wall:.1f}s")
    assert proc.returncode != 0
    assert "STABLEOPD_TEST_FAIL: rank 1 fails at step 1" in proc.stderr
    assert wall < 60  # COMMON sets train.dist_timeout_s=60: nobody waited for it


def test_memory_plan_divides_what_is_sharded_and_prints_readable_units():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stableopd.engine.distributed import human_bytes, memory_plan

    assert [human_bytes(n) for n in (512, 1536, 3 * 2**20, 2.5 * 2**30, 5 * 2**40)] == [
        "512 B", "1.5 KiB", "3 MiB", "2.5 GiB", "5 TiB"]  # fmt: skip
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    size = sum(p.numel() * 4 for p in student.parameters())  # fp32

    def row(text: str, name: str) -> str:
        return next(line for line in text.splitlines() if name in line).split(")")[-1].strip()

    replicated = memory_plan(student, [teacher], world=2, micro_batch=1, seq_len=8, chunk_size=16)
    sharded = memory_plan(
        student, [teacher], world=2, micro_batch=1, seq_len=8, chunk_size=16, shard_frozen=True
    )
    assert row(replicated, "student params") == human_bytes(size / 2)
    assert row(replicated, "AdamW state") == human_bytes(size)  # two fp32 moments, halved
    assert row(replicated, "teacher + reference (replicated)") == human_bytes(size)
    assert row(sharded, "teacher + reference (sharded)") == human_bytes(size / 2)
    assert "GiB" not in replicated  # a 0.4 MB model is not printed as 0.000 GiB
    # activations: every layer's 12 d + 3 d_ff values per token, or with recomputation each layer's input
    # (d per layer) plus one layer's worth; fp32 here; plus three fp32 chunks of the vocabulary
    head = 4 * 3 * 16 * 128
    assert row(replicated, "activations") == human_bytes(4 * 8 * 2 * (12 * 64 + 3 * 128) + head)
    recomputed = memory_plan(
        student, [teacher], world=2, micro_batch=1, seq_len=8, chunk_size=16, checkpointing=True
    )
    assert row(recomputed, "activations") == human_bytes(4 * 8 * (2 * 64 + 12 * 64 + 3 * 128) + head)
    assert "gathered for sampling" in replicated
    assert "gathered for sampling" not in memory_plan(
        student, [], world=2, micro_batch=1, seq_len=8, chunk_size=16, gathered_sampling=False
    )


def test_split_gives_contiguous_shares_that_concatenate_to_the_list():
    from stableopd.engine.distributed import Dist

    items = list(range(7))
    shares = [Dist(rank=r, world=3).split(items) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert Dist(rank=1, world=4).split([0, 1]) == [1] and Dist(rank=3, world=4).split([0, 1]) == []


def test_nproc_passes_a_ranks_config_error_through_as_exit_2(data, tmp_path):
    proc = launch([*args(data, tmp_path / "r", student="./no/such/model"), "--nproc", "2"])
    assert proc.returncode == 2, proc.stderr[-2000:]  # torchrun alone would exit 1
    # each rank's one line, and nothing of torchrun's (no ChildFailedError traceback, no per-rank log lines)
    assert proc.stderr.splitlines() == ["error: model path './no/such/model' does not exist"] * 2, proc.stderr


def test_sigterm_to_an_nproc_run_stops_every_rank_after_the_same_step(data, tmp_path):
    run = tmp_path / "r"
    cli = [*args(data, run, train__steps=8, train__save_every=100, train__eval_every=0), "--nproc", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stableopd", *cli], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and read_rows(run / "metrics.jsonl"):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and "Traceback" not in err, err[-3000:]  # rank 0 says it, once
    step = max(r["step"] for r in read_rows(run / "metrics.jsonl"))
    assert stopped[0].startswith(f"stopped by SIGTERM after step {step}; checkpoint saved.") and step < 8
    assert stopped[0].endswith(" ".join(["stableopd", *cli, "--resume"]))  # --nproc 2 included
    assert (run / "checkpoints" / f"step_{step:06d}" / "COMPLETE").exists()
    resumed = launch([*cli, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == list(range(1, 9))


def test_first_use_of_built_in_models_under_several_processes(data, tmp_path):
    # transformers' save_pretrained writes nothing on rank 1 once the process group exists: the built-ins
    # must be built before it, once, with the other rank waiting. Rank 0 sleeps before loading its models,
    # so a build left until then would be rank 1's.
    cache = tmp_path / "fresh-cache"
    proc = launch(
        [*args(data, tmp_path / "r", train__steps=1, train__eval_every=0), "--nproc", "2"],
        env={"STABLEOPD_CACHE": str(cache), "STABLEOPD_TEST_DELAY": "0:4"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = sorted(p.name for p in (cache / "models").iterdir() if (p / "COMPLETE").exists())
    assert built == ["tiny-teacher-v1", "tiny-v1"]
    assert not [p for p in (cache / "models").iterdir() if "." in p.name and not p.name.endswith(".lock")]


def test_a_pair_with_its_own_templates_and_end_tokens_matches_one_process(data, tmp_path_factory):
    """Qwen2.5-Math student, Qwen2.5-Instruct-like teacher (tests/qwen_family.py): the teacher reads its own
    prompts (split over the ranks with the student's) in scoring, in the JSD update and in validation."""
    from tests import qwen_family

    root = str(tmp_path_factory.mktemp("family"))
    student, teacher = qwen_family.model_dir("qwen_math", root), qwen_family.model_dir("qwen_instruct", root)
    one, two = tmp_path_factory.mktemp("pair") / "one", tmp_path_factory.mktemp("pair") / "two"
    extra = {"loss__objective": "jsd", "loss__jsd_beta": 0.3}
    for run, nproc in ((one, 1), (two, 2)):
        proc = launch(args(data, run, student=str(student), teacher=str(teacher), **extra), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(one, two, grad_rel=QWEN_GRAD_REL)
    for run in (one, two):
        recs = [json.loads(x) for x in (run / "rollouts/step_000001.jsonl").read_text().splitlines()]
        assert all(r["teacher_prompt_token_ids"] != r["prompt_token_ids"] for r in recs)
    rows = read_rows(two / "metrics.jsonl")
    assert rows[-1]["val/reverse_kl"] > 0
