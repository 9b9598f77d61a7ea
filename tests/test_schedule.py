"""Learning-rate schedules and gradient checkpointing (stableopd/core/schedule.py, stableopd/stages/training.py).

What is checked, and against what:
- `lr_at_step` against the formulas written out by hand (warmup ramp, constant, linear and cosine ends and
  midpoints, the floor);
- the config rules that span several keys are errors at load time;
- a distill run with a cosine schedule, warmup and gradient checkpointing logs the hand-computed rate at
  every step; killed after its step-2 checkpoint and resumed, it ends with the same metrics and bitwise-equal
  weights as the run that never stopped; `sft` follows the schedule too;
- gradient checkpointing runs each decoder layer's modules twice per forward/backward (the recomputation happens)
  and gives the gradient of the plain model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from stableopd.cli import app
from stableopd.config import load_config
from stableopd.core.schedule import lr_at_step
from stableopd.engine.objective import Objective
from stableopd.engine.tracking import read_rows
from stableopd.engine.update import optimizer_step
from stableopd.errors import UserError
from stableopd.models.loading import Loaded, resolve_model_path
from stableopd.stages.training import enable_checkpointing
from stableopd.types import GoldSeq

# one_cpu_thread is an autouse fixture: importing it applies it to this module too
from tests.test_trainer import comparable, data_rows, one_cpu_thread, pair_args, write_jsonl  # noqa: F401


def test_warmup_ramps_linearly_to_the_peak():
    assert [lr_at_step(1.0, step=s, total=10, warmup=4) for s in (1, 2, 3, 4, 5, 10)] == [
        0.25,
        0.5,
        0.75,
        1,
        1,
        1,
    ]


# 2 warmup steps, then 10 steps of decay to 0.1 of the peak: step 3 is a tenth of the way, step 7 half-way,
# step 12 the end; cos(pi / 10) = 0.9510565162951535
@pytest.mark.parametrize("schedule, first, mid, end", [
    ("linear", 0.1 + 0.9 * 0.9, 0.55, 0.1),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + 0.9510565162951535), 0.55, 0.1),
    ("constant", 1, 1, 1),
])  # fmt: skip
def test_decay_reaches_the_floor_at_the_last_step(schedule, first, mid, end):
    floor = 0.1 if schedule != "constant" else 0.0
    at = [lr_at_step(2.0, step=s, total=12, schedule=schedule, warmup=2, floor=floor) for s in (3, 7, 12)]
    assert at == pytest.approx([2.0 * first, 2.0 * mid, 2.0 * end], rel=1e-12)


def test_cosine_and_linear_differ_between_their_ends():
    # no warmup: step 1 of 4 is a quarter of the way, cosine 0.5 * (1 + cos(pi / 4)), linear 0.75
    cos = lr_at_step(1.0, step=1, total=4, schedule="cosine")
    lin = lr_at_step(1.0, step=1, total=4, schedule="linear")
    assert cos == pytest.approx(0.5 * (1 + 2**-0.5)) and lin == pytest.approx(0.75)


@pytest.mark.parametrize("sets, message", [
    (["train.warmup_steps=20", "train.steps=10"], "train.warmup_steps (20) is longer than train.steps (10)"),
    (["train.min_lr_ratio=0.1"], "train.min_lr_ratio only applies to train.lr_schedule linear or cosine"),
    (["train.lr_schedule=step"], "train.lr_schedule"),
    (["train.min_lr_ratio=1.5", "train.lr_schedule=cosine"], "train.min_lr_ratio"),
])  # fmt: skip
def test_schedule_rules_are_checked_when_the_config_loads(sets, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, sets)


# ------------------------------------------------------------------------------------------------
# A scheduled, checkpointed run: the logged rates, and an exact resume


SCHEDULED = [
    "-s", "train.steps=4", "-s", "train.lr=1e-3", "-s", "train.lr_schedule=cosine", "-s", "train.warmup_steps=2",
    "-s", "train.min_lr_ratio=0.1", "-s", "train.gradient_checkpointing=true", "-s", "train.prompts_per_step=2",
    "-s", "sampling.n=2", "-s", "sampling.max_new_tokens=8", "-s", "train.eval_every=2", "-s", "data.val_limit=2",
    "-s", "train.save_every=2", "-s", "logging.progress=false",
]  # fmt: skip
# lr 1e-3, warmup 2 of 4 steps, cosine to 0.1: 1/2, 1, then half-way (0.1 + 0.9 / 2) and the floor
EXPECTED_LR = [5e-4, 1e-3, 5.5e-4, 1e-4]


def distill(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["distill", *pair_args(data, out), *SCHEDULED, *extra])


def test_scheduled_checkpointed_run_resumes_exactly(tmp_path, monkeypatch, tiny, tiny_teacher):
    resolve_model_path("tiny"), resolve_model_path("tiny-teacher")
    data = write_jsonl(tmp_path / "arith.jsonl", data_rows(8))
    whole = distill(data, tmp_path / "a")
    assert whole.exit_code == 0, whole.output
    rows = [r for r in read_rows(tmp_path / "a" / "metrics.jsonl") if r["step"] > 0]
    assert [r["optim/lr"] for r in rows] == pytest.approx(EXPECTED_LR, rel=1e-12)

    monkeypatch.setenv(
        "STABLEOPD_TEST_FAIL", "0:3"
    )  # dies at the start of step 3, after the step-2 checkpoint
    assert distill(data, tmp_path / "b").exit_code != 0
    monkeypatch.delenv("STABLEOPD_TEST_FAIL")
    resumed = distill(data, tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output

    rows_a, rows_b = (read_rows(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert comparable(rows_b) == comparable(rows_a)
    wa, wb = (load_file(tmp_path / r / "checkpoints" / "step_000004" / "model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_follows_the_schedule(tmp_path, tiny):
    resolve_model_path("tiny")
    data = write_jsonl(tmp_path / "arith.jsonl", data_rows(8))
    result = CliRunner().invoke(app, ["sft", "--student", "tiny", "--data", str(data), "--out", str(tmp_path / "s"),
                                      *SCHEDULED])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [r for r in read_rows(tmp_path / "s" / "metrics.jsonl") if r["step"] > 0]
    assert [r["optim/lr"] for r in rows] == pytest.approx(EXPECTED_LR, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Gradient checkpointing: the recomputation happens and the gradient is unchanged


def layer_calls_and_grads(model, checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
    loaded = Loaded(name="tiny", path="", model=model, tokenizer=None)
    if checkpointing:
        enable_checkpointing(loaded)
    calls = []
    # transformers checkpoints a layer's forward, not its call, and the recomputation stops once the last saved
    # tensor is back: count calls into the layer's first module
    model.get_decoder().layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    golds = [GoldSeq(prompt=[5, 6, 7], target=[8, 9, 10, 11]), GoldSeq(prompt=[12, 13], target=[14, 15, 2])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()  # checkpointing acts in train mode only
    optimizer_step(
        model,
        optimizer,
        [],
        golds,
        Objective.sft(chunk_size=64, vocab_size=None),
        pad_id=0,
        micro_batch=2,
        grad_clip=0.0,
    )
    return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_and_keeps_the_gradient(tiny):
    plain_calls, plain = layer_calls_and_grads(copy.deepcopy(tiny.model), checkpointing=False)
    ckpt_calls, ckpt = layer_calls_and_grads(copy.deepcopy(tiny.model), checkpointing=True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # one micro-batch: forward, then the recomputation in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:  # the same ops in the same order: equal up to the last bit of fp32
        torch.testing.assert_close(
            ckpt[name], plain[name], rtol=1e-6, atol=1e-7 * float(plain[name].abs().max())
        )


def test_gradient_checkpointing_on_a_model_without_it_is_an_error():
    loaded = Loaded(name="mlp", path="", model=torch.nn.Linear(2, 2), tokenizer=None)
    with pytest.raises(UserError, match="does not support gradient checkpointing"):
        enable_checkpointing(loaded)
