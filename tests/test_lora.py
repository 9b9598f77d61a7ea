"""LoRA students (student.lora): learning, the adapter-off reference, exact resume, export, eval and vLLM sync."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stableopd.config import load_config
from stableopd.engine.tracking import read_rows
from stableopd.errors import UserError
from tests.test_trainer import comparable, distill_cli, pair_args, says, write_jsonl
from tests.test_trainer import sets as small_sets


def sets(**overrides) -> list[str]:
    """test_trainer's small run on the model's own samples (hf): LoRA learning and resume read them."""
    return small_sets(sampling__backend="hf", **overrides)


LORA = ["-s", "student.lora.r=8", "-s", "train.lr=1e-2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"id": f"q{i}", "prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "arith.jsonl", rows)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, data, tiny, tiny_teacher) -> Path:
    """20 LoRA steps on the tiny pair, validating every 5."""
    run = tmp_path_factory.mktemp("lora") / "run"
    result = distill_cli(
        *pair_args(data, run),
        *LORA,
        *sets(
            train__steps=20,
            train__save_every=10,
            train__eval_every=5,
            data__val_limit=8,
            data__limit=4,
            train__prompts_per_step=4,
            sampling__n=4,
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run


def test_lora_learns_and_the_reference_is_the_adapter_off(learned):
    rows = read_rows(learned / "metrics.jsonl")
    rkl = {r["step"]: r["val/reverse_kl"] for r in rows if "val/reverse_kl" in r}
    assert sorted(rkl) == [0, 5, 10, 15, 20]
    assert rkl[20] < 0.75 * rkl[0] and rkl[10] < rkl[0]  # the student moves toward the teacher
    ref_kl = {r["step"]: r["loss/ref_kl"] for r in rows if r["step"] > 0}
    assert abs(ref_kl[1]) < 1e-7  # B = 0: before the first update the student is the reference
    assert all(ref_kl[s] > 1e-3 for s in range(3, 21))  # and drifts from it after
    ckpt = learned / "checkpoints" / "step_000020"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny" and adapter["r"] == 8


def test_setup_keeps_one_copy_of_the_student(data, tiny, tiny_teacher):
    from stableopd.engine import lora
    from stableopd.stages.training import prepare

    cfg = load_config(overrides=[f"data.source={data}", "student.lora.r=4", "train.eval_every=0"])
    setup = prepare(cfg, student_path=None, need_teacher=True, need_ref=True)
    assert isinstance(setup.ref.model, lora.AdapterOff) and setup.ref.model.peft_model is setup.student.model
    trainable, total = lora.trainable_count(setup.student.model)
    base = sum(p.numel() for p in tiny.model.parameters())
    assert total == base + trainable and 0 < trainable < base // 4  # the base once, plus the adapter
    # the reference's forward really runs without the adapter: once B is non-zero it differs from the student
    for name, p in setup.student.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[1, 5, 9, 13]])
    on = setup.student.model.get_decoder()(input_ids=ids).last_hidden_state
    off = setup.ref.model.get_decoder()(input_ids=ids).last_hidden_state
    plain = tiny.model.get_decoder()(input_ids=ids).last_hidden_state
    assert torch.equal(off, plain) and not torch.allclose(on, plain, atol=1e-3)


def test_killed_lora_run_resumes_exactly(tmp_path, data, tiny, tiny_teacher, monkeypatch):
    common = [*LORA, *sets(train__steps=6, train__save_every=2, train__eval_every=3)]
    whole = distill_cli(*pair_args(data, tmp_path / "a"), *common)
    assert whole.exit_code == 0, whole.output + repr(whole.exception)
    monkeypatch.setenv("STABLEOPD_TEST_FAIL", "0:5")  # rank 0 raises at the start of step 5 (saved: 4)
    failed = distill_cli(*pair_args(data, tmp_path / "b"), *common)
    assert failed.exit_code == 1
    monkeypatch.delenv("STABLEOPD_TEST_FAIL")
    resumed = distill_cli(*pair_args(data, tmp_path / "b"), *common, "--resume")
    assert resumed.exit_code == 0, resumed.output + repr(resumed.exception)
    assert says(resumed.output, "resuming from", "step_000004")
    a, b = (read_rows(tmp_path / r / "metrics.jsonl") for r in "ab")
    assert [r["step"] for r in a] == list(range(7)) and comparable(b) == comparable(a)
    wa, wb = (
        load_file(tmp_path / r / "checkpoints" / "step_000006" / "adapter_model.safetensors") for r in "ab"
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(tmp_path / r / "checkpoints" / "step_000006" / "optimizer.pt", weights_only=True)
              for r in "ab")  # fmt: skip
    for sa, sb in zip(oa["state"].values(), ob["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_with_other_lora_settings_is_refused(tmp_path, learned, data):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(learned, run)
    result = distill_cli(*pair_args(data, run), "-s", "student.lora.r=4", *sets(train__steps=21), "--resume")
    assert result.exit_code == 2 and says(result.output, "student.lora", "differs from the adapter")


def test_merged_export_loads_in_plain_transformers_with_the_adapters_logprobs(tmp_path, learned, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from stableopd.cli import app

    result = CliRunner().invoke(app, ["export", str(learned), "--merge", "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    adapted = PeftModel.from_pretrained(
        copy.deepcopy(tiny.model), learned / "checkpoints" / "step_000020"
    ).eval()
    ids = torch.randint(3, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(adapted(input_ids=ids).logits, -1)
        got = torch.log_softmax(merged(input_ids=ids).logits, -1)
        base = torch.log_softmax(tiny.model(input_ids=ids).logits, -1)
    assert (got - want).abs().max() <= 1e-4
    assert (
        base - want
    ).abs().max() > 1e-2  # the adapter changed the model, so the comparison means something
    plain = CliRunner().invoke(app, ["export", str(learned), "--out", str(tmp_path / "adapter")])
    assert plain.exit_code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "optimizer.pt").exists()


def test_export_merge_of_a_full_weight_run_is_refused(tmp_path, data, tiny, tiny_teacher):
    from typer.testing import CliRunner

    from stableopd.cli import app

    run = tmp_path / "full"
    assert distill_cli(*pair_args(data, run), *sets(train__steps=1, train__eval_every=0)).exit_code == 0
    result = CliRunner().invoke(app, ["export", str(run), "--merge"])
    assert result.exit_code == 2 and says(result.output, "trained full weights", "export without --merge")


def test_eval_of_a_lora_run_reads_the_adapter(learned, tiny):
    from stableopd.models.loading import load_model

    merged = load_model(str(learned / "checkpoints" / "step_000020"), dtype="float32", device="cpu")
    ids = torch.tensor([[2, 7, 11, 4]])
    with torch.no_grad():
        assert not torch.allclose(
            merged.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits, atol=1e-3
        )
    assert type(merged.model).__name__ == type(tiny.model).__name__  # merged: a plain transformers model


def test_vllm_sync_pushes_the_merged_weights(tiny, monkeypatch):
    from stableopd.backends.vllm import VLLMBackend, hf_weight_items
    from stableopd.engine import lora
    from tests.vllm_double import FakeVLLM

    FakeVLLM().install(monkeypatch)
    spec = load_config(overrides=["student.lora.r=4"]).student.lora
    model = lora.attach(copy.deepcopy(tiny.model), spec, base_name="tiny")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    pushed = dict(hf_weight_items(model))
    assert set(pushed) == {
        k for k in reference if k != "lm_head.weight" or not tiny.model.config.tie_word_embeddings
    }
    assert all(torch.allclose(pushed[k], reference[k], atol=1e-6) for k in pushed)
    assert any(not torch.equal(pushed[k], tiny.model.state_dict()[k]) for k in pushed)
    backend = VLLMBackend(
        model=model, tokenizer=tiny.tokenizer, model_path=tiny.path, stop_ids=[0], options={}
    )
    engine = backend.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    assert engine.loads == 1  # the engine loaded the base from disk; the adapter reached it at start
    held = engine.hf_model.state_dict()
    assert all(torch.allclose(held[k], reference[k], atol=1e-6) for k in pushed)
    with pytest.raises(UserError, match="is a LoRA adapter"):
        VLLMBackend(
            model=None,
            tokenizer=tiny.tokenizer,
            model_path=str(_adapter_dir(model, monkeypatch)),
            stop_ids=[0],
            options={},
        )


def _adapter_dir(model, monkeypatch) -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def test_lora_trains_in_one_process_only():
    from stableopd.engine.distributed import check_launch

    cfg = load_config(overrides=["student.lora.r=4", "train.prompts_per_step=4"])
    check_launch(1, cfg)
    with pytest.raises(UserError, match="LoRA student .* trains in one process"):
        check_launch(2, cfg)


def test_lora_config_errors():
    with pytest.raises(UserError, match="lm_head is the embedding or output head"):
        load_config(overrides=["student.lora.target_modules=[q_proj,lm_head]"])
    with pytest.raises(UserError, match="config key 'teacher.lora' does not exist"):
        load_config(overrides=["teacher.lora.r=4"])
    with pytest.raises(UserError, match="student.lora.dropout"):
        load_config(overrides=["student.lora.dropout=1.5"])


@pytest.mark.slow
def test_lora_on_smollm2_reference_kl_and_merged_export(tmp_path, smollm2):
    """A real Llama-architecture model with tied embeddings: "all-linear" leaves the tied head alone, the
    reference KL starts at 0 and grows, and the merged export reproduces the adapter model's log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from stableopd.cli import app

    run = tmp_path / "run"
    rows = [
        {"id": f"q{i}", "prompt": f"What is {i} plus {i + 2}?", "answer": str(2 * i + 2)} for i in range(2)
    ]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    # a sharper copy of itself as the teacher: a real target the student is not at from the start
    result = distill_cli(
        "--student",
        "smollm2-135m",
        "--teacher",
        "smollm2-135m",
        "--data",
        str(data),
        "--out",
        str(run),
        "-s",
        "student.lora.r=8",
        "-s",
        "train.lr=1e-3",
        "-s",
        "loss.teacher_temperature=0.5",
        *sets(
            train__steps=3,
            train__save_every=3,
            train__eval_every=0,
            train__prompts_per_step=1,
            sampling__max_new_tokens=8,
        ),
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    ref_kl = [r["loss/ref_kl"] for r in read_rows(run / "metrics.jsonl")]
    assert abs(ref_kl[0]) < 1e-7 and ref_kl[2] > 1e-4
    ckpt = run / "checkpoints" / "step_000003"
    assert "lm_head" not in json.dumps(
        json.loads((ckpt / "adapter_config.json").read_text())["target_modules"]
    )
    assert (
        CliRunner().invoke(app, ["export", str(run), "--merge", "--out", str(tmp_path / "m")]).exit_code == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    adapted = PeftModel.from_pretrained(copy.deepcopy(smollm2.model), ckpt).eval()
    ids = smollm2.tokenizer("The sum of 12 and 30 is 42, because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(adapted(input_ids=ids).logits, -1)
        got = torch.log_softmax(merged(input_ids=ids).logits, -1)
        base = torch.log_softmax(smollm2.model(input_ids=ids).logits, -1)
    assert (got - want).abs().max() <= 1e-4 and (base - want).abs().max() > 1e-3
