"""The vLLM adapter against a test double of vLLM 0.33's API (tests/vllm_double.py says what it cannot cover).

Real-engine tests sit at the end behind the `vllm` and `gpu` markers.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from stableopd.backends import vllm as vb
from stableopd.backends.base import build_backend
from stableopd.errors import UserError
from stableopd.models.loading import load_model, stop_token_ids
from stableopd.types import SamplingParams
from tests.push import Push
from tests.vllm_double import CompletionOutput, FakeVLLM, Logprob


@pytest.fixture
def fake_vllm(monkeypatch):
    return FakeVLLM().install(monkeypatch)


@pytest.fixture(scope="module")
def tiny_loaded():
    return load_model("tiny")


def _backend(loaded, **options):
    return build_backend(
        "vllm",
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        model_path=loaded.path,
        stop_ids=stop_token_ids(loaded.tokenizer, loaded.model),
        options=options,
    )


def _teacher_forced(model, prompt, ids, vocab):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1, :vocab]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


def test_module_imports_without_vllm_and_building_says_how_to_install(monkeypatch, tiny_loaded):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    importlib.reload(vb)
    with pytest.raises(UserError, match=r"pip install 'stableopd\[vllm\]'"):
        _backend(tiny_loaded)


def test_options_are_validated_and_reach_the_engine(fake_vllm, tiny_loaded):
    with pytest.raises(
        UserError, match="unknown vllm option 'sampling.options.gpu_mem'.*gpu_memory_utilization"
    ):
        _backend(tiny_loaded, gpu_mem=0.5)
    with pytest.raises(UserError, match="tensor_parallel_size"):
        _backend(tiny_loaded, tensor_parallel_size=0)
    backend = _backend(tiny_loaded, gpu_memory_utilization=0.3, max_model_len=512)
    kw = backend.llm.init_kwargs
    assert kw["model"] == tiny_loaded.path and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["gpu_memory_utilization"] == 0.3 and kw["max_model_len"] == 512 and "sync_every" not in kw


def test_sampling_kwargs_map_every_field():
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=64, seed=5)
    kw = vb.sampling_kwargs(p, [2, 7], seed=11, allowed_token_ids=[0, 1, 2])
    assert kw == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_tokens": 64,
        "seed": 11,
        "logprobs": 0,
        "stop_token_ids": [2, 7],
        "ignore_eos": False,
        "detokenize": False,
        "allowed_token_ids": [0, 1, 2],
    }
    greedy = vb.sampling_kwargs(SamplingParams(n=4, temperature=0.0), [2], seed=0, allowed_token_ids=None)
    assert greedy["n"] == 1 and greedy["top_k"] == 0 and "allowed_token_ids" not in greedy
    with pytest.raises(UserError, match="at most 2.0"):
        vb.sampling_kwargs(SamplingParams(temperature=2.5), [2], seed=0, allowed_token_ids=None)


def test_parse_completion_keeps_stop_token_and_reads_logprobs():
    lps = [{5: Logprob(-0.5)}, {6: Logprob(-1.5)}, {2: Logprob(-0.25)}]
    s = vb.parse_completion(CompletionOutput(0, [5, 6, 2], lps, "stop", None), [2])
    assert (s.token_ids, s.logprobs, s.finish_reason) == ([5, 6, 2], [-0.5, -1.5, -0.25], "stop")
    s = vb.parse_completion(CompletionOutput(0, [5, 6], lps[:2], "length", None), [2])
    assert s.finish_reason == "length"
    with pytest.raises(RuntimeError, match="abort"):
        vb.parse_completion(CompletionOutput(0, [5], lps[:1], "abort"), [2])
    with pytest.raises(RuntimeError, match="logprobs=0"):
        vb.parse_completion(CompletionOutput(0, [5, 6], None, "length"), [2])
    with pytest.raises(RuntimeError, match="sampled token 6"):
        vb.parse_completion(
            CompletionOutput(0, [5, 6], [{5: Logprob(-1.0)}, {9: Logprob(-1.0)}], "length"), [2]
        )


def test_generate_returns_processed_logprobs_that_match_a_teacher_forced_pass(fake_vllm, tiny_loaded):
    backend = _backend(tiny_loaded)
    tok = tiny_loaded.tokenizer
    prompts = [tok("What is 1+1?")["input_ids"], tok("Hi")["input_ids"]]
    out = backend.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3))
    assert [len(s) for s in out] == [2, 2]
    for prompt, samples in zip(prompts, out):
        for s in samples:
            assert all(t < len(tok) for t in s.token_ids)  # padded embedding rows are never sampled
            ref = _teacher_forced(tiny_loaded.model, prompt, s.token_ids, len(tok))
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)
            assert (s.finish_reason == "stop") == (s.token_ids[-1] in backend.stop_ids)
    again = backend.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3))
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in out]
    greedy = backend.generate(prompts[:1], SamplingParams(n=3, temperature=0.0, max_new_tokens=8))
    assert len(greedy[0]) == 3 and len({tuple(s.token_ids) for s in greedy[0]}) == 1


def test_banned_ids_are_left_out_of_the_allowed_ids(fake_vllm, tiny_loaded):
    assert vb.allowed_ids(10, 10, ()) is None  # nothing to exclude: vLLM samples from every row
    assert vb.allowed_ids(10, 12, ()) == list(range(10))  # padded rows
    assert vb.allowed_ids(10, 10, (3, 7)) == [0, 1, 2, 4, 5, 6, 8, 9]
    backend = _backend(tiny_loaded)
    engine = backend.llm.engine_model.hf_model
    head, engine.lm_head = engine.lm_head, Push(engine.lm_head, 5)
    try:
        prompts = [
            tiny_loaded.tokenizer("What is 1+1?")["input_ids"],
            tiny_loaded.tokenizer("Hi")["input_ids"],
        ]
        pushed = backend.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=1))
        assert all(s.token_ids == [5, 5, 5, 5] for g in pushed for s in g)
        banned = backend.generate(
            prompts, SamplingParams(n=2, max_new_tokens=4, seed=1, banned_token_ids=(5,))
        )
        assert all(5 not in s.token_ids and s.token_ids for g in banned for s in g)
    finally:
        engine.lm_head = head


def test_hf_weight_items_unwraps_names_and_skips_tied_head(tiny_loaded):
    names = dict(vb.hf_weight_items(tiny_loaded.model))
    assert set(names) == set(tiny_loaded.model.state_dict())

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
            self.config = inner.config

    wrapped = dict(vb.hf_weight_items(Wrapped(tiny_loaded.model)))
    assert set(wrapped) == set(names)
    tiny_loaded.model.config.tie_word_embeddings = True
    try:
        assert "lm_head.weight" not in dict(vb.hf_weight_items(tiny_loaded.model))
    finally:
        tiny_loaded.model.config.tie_word_embeddings = False


def test_sync_pushes_weights_and_resets_prefix_cache(fake_vllm, tiny_loaded):
    student = load_model("tiny")  # a private copy we can perturb
    backend = _backend(student, sync_every=2)
    engine = backend.llm.engine_model.hf_model
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(0.01)
    backend.sync_weights(student.model)  # 1st update: skipped (sync_every=2)
    assert not torch.equal(engine.lm_head.weight, student.model.lm_head.weight)
    backend.sync_weights(student.model)
    for name, p in student.model.named_parameters():
        assert torch.equal(dict(engine.named_parameters())[name], p), name
    assert backend.llm.calls[-1] == "reset_prefix_cache"


def test_sleep_mode_wakes_weights_before_sync_and_sleeps_after_sampling(fake_vllm, tiny_loaded):
    backend = _backend(tiny_loaded, enable_sleep_mode=True)
    tok = tiny_loaded.tokenizer
    backend.generate([tok("Hi")["input_ids"]], SamplingParams(n=1, max_new_tokens=2))
    backend.sync_weights(tiny_loaded.model)
    backend.generate([tok("Hi")["input_ids"]], SamplingParams(n=1, max_new_tokens=2))
    assert backend.llm.calls == [
        "generate",
        "sleep(1)",
        "wake_up(weights)",
        "reset_prefix_cache",
        "wake_up(kv_cache)",
        "generate",
        "sleep(1)",
    ]


def test_scorer_refuses_temperature_and_matches_teacher_forced(fake_vllm, tiny_loaded):
    scorer = vb.VLLMScorer(tiny_loaded.path, {})
    tok = tiny_loaded.tokenizer
    prompt, target = tok("What is 2+2?")["input_ids"], tok("4")["input_ids"] + [tok.eos_token_id]
    with pytest.raises(UserError, match="ignore temperature"):
        scorer.score([prompt], [target], temperature=0.7)
    got = scorer.score([prompt], [target])[0]
    ref = _teacher_forced(tiny_loaded.model, prompt, target, tiny_loaded.model.config.vocab_size)
    torch.testing.assert_close(torch.tensor(got), ref, atol=1e-5, rtol=0)


@pytest.mark.vllm
@pytest.mark.gpu
def test_real_engine_logprobs_match_hf(tiny_loaded):
    pytest.importorskip("vllm")
    backend = _backend(tiny_loaded, gpu_memory_utilization=0.2, enforce_eager=True)
    tok = tiny_loaded.tokenizer
    prompt = tok("What is 1+1?")["input_ids"]
    for s in backend.generate([prompt], SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=1))[0]:
        ref = _teacher_forced(tiny_loaded.model.cuda().float().cpu(), prompt, s.token_ids, len(tok))
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=2e-2, rtol=0)


def _distill_cfg(tmp_path, name: str, **extra):
    from stableopd.config import load_config

    sets = [
        "train.steps=3",
        "train.prompts_per_step=2",
        "sampling.n=2",
        "sampling.max_new_tokens=8",
        "train.eval_every=0",
        "train.lr=0.05",
        "loss.objective=opd",
        "logging.progress=false",
        "sampling.backend=vllm",
        "data.source=builtin:arith?digits=1",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(
        None, sets, {"out": str(tmp_path / name), "student.name": "tiny", "teacher.name": "tiny-teacher"}
    )


def test_distill_with_synced_engine_samples_from_trained_weights(fake_vllm, tmp_path):
    import json

    from stableopd.stages.distill import run_distill

    assert run_distill(_distill_cfg(tmp_path, "synced")) == 0
    rows = [json.loads(line) for line in (tmp_path / "synced" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(abs(r["diag/kl_sample_train"]) < 1e-4 for r in rows)
    engine = fake_vllm.LLM.instances[-1]
    assert engine.engine_model.loads == 3 and engine.calls.count("reset_prefix_cache") == 3


def test_distill_stops_when_weight_sync_silently_fails(fake_vllm, tmp_path, monkeypatch):
    from stableopd.errors import TrainingStopped
    from stableopd.stages.distill import run_distill

    monkeypatch.setattr(
        vb, "push_weights", lambda llm, model: None
    )  # the sync "succeeds" but changes nothing
    with pytest.raises(TrainingStopped, match="weight sync failed"):
        run_distill(_distill_cfg(tmp_path, "stale"))


def test_vllm_teacher_engine_scores_the_sampled_tokens(fake_vllm, tmp_path):
    """vLLM's prompt log-probs normalise over every embedding row (padding included), the HF path over the
    tokenizer's vocabulary; for the random tiny teacher the padded rows carry real mass, so compare each
    with its own reference."""
    import json

    from stableopd.stages.distill import run_distill

    run_distill(
        _distill_cfg(tmp_path, "vt", **{"sampling.backend": "hf", "train.steps": 1, "teacher.engine": "vllm"})
    )
    teacher = load_model("tiny-teacher").model
    rows = [
        json.loads(x) for x in (tmp_path / "vt" / "rollouts" / "step_000001.jsonl").read_text().splitlines()
    ]
    for r in rows:
        ref = _teacher_forced(
            teacher, r["prompt_token_ids"], r["response_token_ids"], teacher.config.vocab_size
        )
        torch.testing.assert_close(torch.tensor(r["teacher_logprobs"]), ref, atol=1e-4, rtol=0)
        hf_ref = _teacher_forced(teacher, r["prompt_token_ids"], r["response_token_ids"], 101)
        assert not torch.allclose(torch.tensor(r["teacher_logprobs"]), hf_ref, atol=1e-3)
    with pytest.raises(UserError, match="ignore temperature"):  # refused when the config loads
        _distill_cfg(tmp_path, "vt2", **{"teacher.engine": "vllm", "loss.teacher_temperature": 0.5})


def test_config_overrides_reach_the_engine_so_it_samples_from_the_trained_model(fake_vllm, tmp_path):
    """The overrides change the student's distribution (rms_norm_eps=5 moves log-probs by ~1e-2 nats on the
    tiny model); an engine built without them would sample from another model, and the sampler-trainer
    log-prob difference would show it."""
    import json

    from stableopd.stages.distill import run_distill

    over = {"train.steps": 1, "student.config_overrides": "{rope_theta: 300000.0, rms_norm_eps: 5.0}"}
    assert run_distill(_distill_cfg(tmp_path, "over", **over)) == 0
    engine = fake_vllm.LLM.instances[-1]
    assert engine.init_kwargs["hf_overrides"]["rope_parameters"]["rope_theta"] == 300000.0
    row = json.loads((tmp_path / "over" / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(row["diag/kl_sample_train"]) < 1e-4
