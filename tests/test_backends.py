"""The sampling contract: HF backend log-probs against a teacher-forced reference, stops, seeds, the registry.

The consistency tests are the backbone: at temperature 1 with no top-p/top-k, the log-prob the sampler
reports for every token (and for the stop token) must equal the log-prob of that token under a plain
forward pass of the same model on prompt + response, restricted to the tokenizer's real vocabulary. A
padding, position-id, chat-template or stop-token bug breaks the equality.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch

from stableopd.backends.base import Backend, available_backends, build_backend, split_stop
from stableopd.config import load_config
from stableopd.data.sources import encode_prompts
from stableopd.errors import UserError
from stableopd.models.loading import stop_token_ids
from stableopd.stages.rollout import make_record, sample_records
from stableopd.types import Example, Rollout, Sample, SamplingParams

PROMPTS = ["hi", "What is 12+345? Explain every step, then give the answer.", "Say a word.\nThen stop."]


def hf_backend(loaded, model=None, **options) -> Backend:
    return build_backend(
        "hf",
        model=model or loaded.model,
        tokenizer=loaded.tokenizer,
        model_path=loaded.path,
        stop_ids=stop_token_ids(loaded.tokenizer, loaded.model),
        options=options,
    )


def encoded(loaded, prompts=PROMPTS) -> list[list[int]]:
    return encode_prompts(loaded.tokenizer, [Example(str(i), p) for i, p in enumerate(prompts)])


@torch.no_grad()
def teacher_forced(
    model, prompt: list[int], response: list[int], vocab: int, temperature: float = 1.0, top_k: int = 0
) -> torch.Tensor:
    """Log-prob of each response token given prompt + previous tokens: one unpadded forward pass."""
    ids = torch.tensor([prompt + response])  # (1, L + T)
    logits = model(ids).logits[0, :, :vocab].float() / temperature  # (L + T, V) padded rows dropped
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (L + T, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1)
    # logits at position t predict token t + 1
    rows = logprobs[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # (T, V)
    return rows.gather(-1, torch.tensor(response)[:, None])[:, 0]  # (T,)


def records_for(loaded, params: SamplingParams, prompts=PROMPTS, **options) -> list[dict]:
    """The records as a records file holds them."""
    tok = loaded.tokenizer
    examples = [Example(f"p{i}", p) for i, p in enumerate(prompts)]
    stop_ids = stop_token_ids(tok, loaded.model)
    records = sample_records(
        hf_backend(loaded, **options),
        tok,
        examples,
        encoded(loaded, prompts),
        params,
        stop_ids,
        rep_tail_chars=10_000,
        rep_ratio=10.0,
        progress=False,
    )
    return [r.to_json() for r in records]


def assert_consistent(loaded, records: list[dict], tol: float = 1e-4, **reference) -> int:
    """Every sampler log-prob (stop token included) equals the teacher-forced one; returns tokens checked."""
    vocab, checked = len(loaded.tokenizer), 0
    for rec in records:
        response = rec["response_token_ids"] + ([] if rec["truncated"] else [rec["stop_token_id"]])
        sampled = rec["sampler_logprobs"] + ([] if rec["truncated"] else [rec["stop_logprob"]])
        expected = teacher_forced(loaded.model, rec["prompt_token_ids"], response, vocab, **reference)
        torch.testing.assert_close(torch.tensor(sampled), expected, atol=tol, rtol=0)
        checked += len(response)
    return checked


# ------------------------------------------------------------------------------------------------
# Consistency with a teacher-forced forward pass


@pytest.mark.parametrize("batch_size", [16, 1])
def test_sampler_logprobs_match_teacher_forcing_tiny(tiny, batch_size):
    prompt_lens = {len(p) for p in encoded(tiny)}
    assert len(prompt_lens) == len(PROMPTS)  # different lengths: left padding is exercised
    records = records_for(
        tiny, SamplingParams(n=3, temperature=1.0, max_new_tokens=32, seed=0), batch_size=batch_size
    )
    assert len(records) == 3 * len(PROMPTS)
    assert [(r["prompt_id"], r["sample_idx"]) for r in records] == [
        (f"p{i}", j) for i in range(3) for j in range(3)
    ]
    assert {r["finish_reason"] for r in records} == {"stop", "length"}  # both endings are checked
    assert assert_consistent(tiny, records) > 150


def test_sampler_logprobs_match_teacher_forcing_tiny_teacher(tiny_teacher):
    # 136 embedding rows for 101 tokens: the padded rows must be excluded from the normalisation
    records = records_for(tiny_teacher, SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=4))
    assert assert_consistent(tiny_teacher, records) > 100


def test_model_generation_config_does_not_leak_into_sampling(tiny):
    # Hub checkpoints ship sampling defaults (Qwen2.5-Instruct: top_k=20, top_p=0.8, repetition_penalty=1.05);
    # they must not change what the backend samples from.
    model = copy.deepcopy(tiny.model)
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty = True, 0.7, 20, 0.8, 1.3
    backend = hf_backend(tiny, model=model)
    prompts = encoded(tiny)
    samples = backend.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=24, seed=1))
    for prompt, per_prompt in zip(prompts, samples):
        for s in per_prompt:
            expected = teacher_forced(model, prompt, s.token_ids, len(tiny.tokenizer))
            torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=1e-4, rtol=0)


def test_temperature_logprobs_are_of_the_tempered_distribution(tiny):
    records = records_for(tiny, SamplingParams(n=2, temperature=0.7, max_new_tokens=24, seed=2))
    assert assert_consistent(tiny, records, temperature=0.7) > 50


def test_top_k_logprobs_are_renormalised_over_the_top_k(tiny):
    k = 5
    records = records_for(tiny, SamplingParams(n=2, temperature=1.0, top_k=k, max_new_tokens=24, seed=3))
    assert assert_consistent(tiny, records, top_k=k) > 50
    for rec in records:
        assert all(lp > -torch.inf for lp in rec["sampler_logprobs"])


def test_greedy_is_the_argmax_and_deterministic(tiny):
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=20, seed=0)
    a = records_for(tiny, params)
    b = records_for(tiny, SamplingParams(n=2, temperature=0.0, max_new_tokens=20, seed=99))
    strip = [(r["response_token_ids"], r["finish_reason"]) for r in a]
    assert strip == [(r["response_token_ids"], r["finish_reason"]) for r in b]
    assert a[0]["response_token_ids"] == a[1]["response_token_ids"]  # n greedy samples are identical
    vocab = len(tiny.tokenizer)
    for rec in a:
        response = rec["response_token_ids"] + ([] if rec["truncated"] else [rec["stop_token_id"]])
        ids = torch.tensor([rec["prompt_token_ids"] + response])
        with torch.no_grad():
            logits = tiny.model(ids).logits[0, :, :vocab]  # (L + T, V)
        rows = logits[len(rec["prompt_token_ids"]) - 1 : -1]  # (T, V)
        chosen = rows.gather(-1, torch.tensor(response)[:, None])[:, 0]
        assert torch.all(chosen >= rows.max(dim=-1).values - 1e-4)  # each token is the argmax (up to ties)
    # greedy log-probs are the temperature-1 log-probs of the argmax
    assert assert_consistent(tiny, a) > 0


@pytest.mark.slow
def test_sampler_logprobs_match_teacher_forcing_smollm2(smollm2):
    prompts = ["Hi!", "Name three colours of the rainbow, in order."]
    assert len({len(p) for p in encoded(smollm2, prompts)}) == 2
    records = records_for(smollm2, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=0), prompts)
    assert len(records) == 6
    assert assert_consistent(smollm2, records) >= 6 * 2


# ------------------------------------------------------------------------------------------------
# Stops, truncation, padding


def test_truncated_exactly_when_no_stop_token(tiny):
    stop_ids = stop_token_ids(tiny.tokenizer, tiny.model)
    pad = tiny.tokenizer.pad_token_id
    max_new = 30
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=max_new, seed=5)
    samples = hf_backend(tiny).generate(encoded(tiny), params)
    assert [len(s) for s in samples] == [8, 8, 8]
    reasons = set()
    for s in (s for per_prompt in samples for s in per_prompt):
        reasons.add(s.finish_reason)
        assert len(s.token_ids) == len(s.logprobs) <= max_new
        stops_at = [i for i, t in enumerate(s.token_ids) if t in stop_ids]
        if s.finish_reason == "stop":
            assert stops_at == [len(s.token_ids) - 1]  # the stop token ends the sample, nothing after it
        else:
            assert stops_at == [] and len(s.token_ids) == max_new
            assert s.token_ids[-3:] != [pad] * 3  # not padding from a finished neighbour
        ids, lps, truncated = split_stop(s, stop_ids)
        assert truncated == (s.finish_reason == "length")
        assert not set(ids) & set(stop_ids) and len(ids) == len(lps)
    assert reasons == {"stop", "length"}


def test_records_exclude_the_stop_token_and_padding(tiny):
    tok = tiny.tokenizer
    records = records_for(tiny, SamplingParams(n=4, temperature=1.0, max_new_tokens=30, seed=6))
    assert {r["truncated"] for r in records} == {True, False}
    for rec in records:
        assert rec["n_tokens"] == len(rec["response_token_ids"]) == len(rec["sampler_logprobs"])
        assert rec["truncated"] == (rec["finish_reason"] == "length")
        assert tok.eos_token_id not in rec["response_token_ids"]
        assert "<|im_end|>" not in rec["response"] and "<|pad|>" not in rec["response"]
        assert rec["response"] == tok.decode(rec["response_token_ids"], skip_special_tokens=True)
        if rec["truncated"]:
            assert rec["n_tokens"] == 30 and rec["stop_token_id"] is None and rec["stop_logprob"] is None
        else:
            assert rec["stop_token_id"] == tok.eos_token_id and rec["stop_logprob"] <= 0


def test_split_stop_on_hand_made_samples():
    assert split_stop(Sample([5, 6, 2], [-1.0, -2.0, -3.0], "stop"), [2]) == ([5, 6], [-1.0, -2.0], False)
    assert split_stop(Sample([5, 6], [-1.0, -2.0], "length"), [2]) == ([5, 6], [-1.0, -2.0], True)
    # an empty response: the stop token came first
    assert split_stop(Sample([2], [-0.5], "stop"), [2, 9]) == ([], [], False)
    assert split_stop(Sample([5, 9], [-1.0, -0.5], "stop"), [2, 9]) == ([5], [-1.0], False)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_teacher"])
def test_padded_rows_are_never_sampled(fixture, request):
    loaded = request.getfixturevalue(fixture)
    vocab = len(loaded.tokenizer)
    rows = loaded.model.get_output_embeddings().weight.shape[0]
    assert rows > vocab  # a random model gives the padded rows about (rows - vocab) / rows of the mass
    samples = hf_backend(loaded).generate(encoded(loaded), SamplingParams(n=8, max_new_tokens=32, seed=7))
    tokens = [t for per_prompt in samples for s in per_prompt for t in s.token_ids]
    assert len(tokens) > 300
    assert max(tokens) < vocab


# ------------------------------------------------------------------------------------------------
# Seeds and RNG


def test_same_seed_same_samples_different_seed_different(tiny):
    backend = hf_backend(tiny)
    prompts = encoded(tiny)

    def draw(seed):
        out = backend.generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=seed))
        return [(s.token_ids, s.logprobs) for per_prompt in out for s in per_prompt]

    first = draw(11)
    assert draw(11) == first
    assert draw(12) != first
    assert first[0] != first[1]  # the n samples of one prompt differ


def test_sampling_does_not_perturb_the_global_rng(tiny):
    backend = hf_backend(tiny, batch_size=2)
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    backend.generate(encoded(tiny), SamplingParams(n=2, max_new_tokens=8, seed=3))
    assert torch.equal(torch.rand(5), expected)


def test_training_mode_is_restored(tiny):
    model = copy.deepcopy(tiny.model).train()
    hf_backend(tiny, model=model).generate(encoded(tiny, ["hi"]), SamplingParams(max_new_tokens=4))
    assert model.training


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (
            {"batch_size": 0},
            "sampling.options.batch_size: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"beams": 2}, "unknown hf option 'sampling.options.beams'; valid: batch_size, cache, compile"),
        ({"cache": "paged"}, "sampling.options.cache: Input should be 'dynamic' or 'static' (got 'paged')"),
        (
            {"compile": True},
            "sampling.options: compile: true needs cache: static (a growing cache changes shape at every token)",
        ),
    ],
)
def test_hf_options_are_validated(tiny, options, fragment):
    with pytest.raises(UserError) as exc:
        hf_backend(tiny, **options)
    assert str(exc.value) == fragment
    with pytest.raises(UserError) as at_load:  # the same check runs when the config loads, before any model
        load_config(None, [f"sampling.options={json.dumps(options)}"])
    assert str(at_load.value) == fragment


class GenerateSpy:
    """Wraps a model's real `generate`, keeping each call's cache type; `get_compiled_call` is replaced by the
    uncompiled forward, recording that transformers asked for it (a real compile takes a minute on CPU)."""

    def __init__(self, model, monkeypatch) -> None:
        self.caches: list[str] = []
        self.compiled: list[object] = []
        real = model.generate

        def generate(*args, **kwargs):
            out = real(*args, **kwargs)
            self.caches.append(type(out.past_key_values).__name__)
            return out

        def get_compiled_call(compile_config):
            self.compiled.append(compile_config)
            return model.__call__

        monkeypatch.setattr(model, "generate", generate)
        monkeypatch.setattr(model, "get_compiled_call", get_compiled_call)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_static_cache_and_compile_sample_what_the_default_does(tiny, monkeypatch, temperature):
    spy = GenerateSpy(tiny.model, monkeypatch)
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=24, seed=3)
    runs = {
        name: records_for(tiny, params, **options)
        for name, options in [
            ("dynamic", {}),
            ("static", {"cache": "static"}),
            ("compiled", {"cache": "static", "compile": True}),
        ]
    }
    assert spy.caches == ["DynamicCache", "StaticCache", "StaticCache"]
    assert len(spy.compiled) == 1 and spy.compiled[0].mode == "default"  # only the compile option compiles
    for name in ("static", "compiled"):
        assert [r["response_token_ids"] for r in runs[name]] == [
            r["response_token_ids"] for r in runs["dynamic"]
        ]
        for a, b in zip(runs[name], runs["dynamic"]):
            torch.testing.assert_close(a["sampler_logprobs"], b["sampler_logprobs"], atol=1e-5, rtol=0)
    if temperature:
        assert assert_consistent(tiny, runs["static"]) > 50


# ------------------------------------------------------------------------------------------------
# Registry: built-ins and plugins through the same entry points

FAKE_MODULE = textwrap.dedent(
    '''
    from stableopd.backends.base import Sample


    class EchoBackend:
        """Answers every prompt with its last `options["k"]` ids, then a stop token (odd samples run out)."""

        name = "echo"

        def __init__(self, *, model, tokenizer, model_path, stop_ids, options):
            self.stop_ids, self.k, self.model_path = stop_ids, options.get("k", 2), model_path
            self.synced = None

        def generate(self, prompts_P, params):
            out = []
            for prompt in prompts_P:
                samples = []
                for i in range(params.n):
                    if i % 2 == 0:
                        ids = prompt[-self.k:] + [self.stop_ids[0]]
                        samples.append(Sample(ids, [-0.5] * len(ids), "stop"))
                    else:
                        ids = (prompt * params.max_new_tokens)[: params.max_new_tokens]
                        samples.append(Sample(ids, [-0.25] * len(ids), "length"))
                out.append(samples)
            return out

        def sync_weights(self, model):
            self.synced = model


    class NotABackend:
        def __init__(self, **kwargs):
            pass
    '''
)


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    """A plugin distribution on sys.path, declaring two backends in the `stableopd.backends` group."""
    (tmp_path / "stableopd_echo_plugin.py").write_text(FAKE_MODULE)
    info = tmp_path / "stableopd_echo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stableopd-echo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[stableopd.backends]\n"
        "echo = stableopd_echo_plugin:EchoBackend\n"
        "broken = stableopd_echo_plugin:NotABackend\n"
        "missing = stableopd_no_such_module:Thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "echo"
    import sys

    sys.modules.pop("stableopd_echo_plugin", None)


def test_builtins_are_registered():
    registry = available_backends()
    assert registry["hf"] == "stableopd.backends.hf:HFBackend"
    assert registry["vllm"] == "stableopd.backends.vllm:VLLMBackend"


def test_hf_backend_is_built_by_name(tiny):
    from stableopd.backends.hf import HFBackend

    backend = hf_backend(tiny, batch_size=3)
    assert isinstance(backend, HFBackend) and isinstance(backend, Backend)
    assert backend.options.batch_size == 3 and backend.vocab_size == len(tiny.tokenizer)
    backend.sync_weights(tiny.model)
    assert backend.model is tiny.model


def test_unknown_backend_lists_the_available_ones(tiny):
    with pytest.raises(UserError) as exc:
        build_backend("sglang", model=None, tokenizer=tiny.tokenizer, model_path="x", stop_ids=[2])
    assert (
        str(exc.value) == "unknown sampling backend 'sglang'; available: fake, hf, vllm"
    )  # fake: the test plugin (conftest.py)


def test_plugin_backend_is_found_and_used(tiny, echo_plugin):
    registry = available_backends()
    assert registry["echo"] == "stableopd_echo_plugin:EchoBackend"
    backend = build_backend(
        "echo", model=tiny.model, tokenizer=tiny.tokenizer, model_path="/m", stop_ids=[2], options={"k": 3}
    )
    assert type(backend).__module__ == "stableopd_echo_plugin" and backend.model_path == "/m"
    out = backend.generate([[10, 11, 12, 13]], SamplingParams(n=2, max_new_tokens=5))
    assert [(s.token_ids, s.finish_reason) for s in out[0]] == [
        ([11, 12, 13, 2], "stop"),
        ([10, 11, 12, 13, 10], "length"),
    ]
    backend.sync_weights("w")
    assert backend.synced == "w"


def test_plugin_errors(tiny, echo_plugin):
    kw = dict(model=None, tokenizer=tiny.tokenizer, model_path="x", stop_ids=[2])
    with pytest.raises(UserError) as exc:
        build_backend("nope", **kw)
    assert (
        str(exc.value) == "unknown sampling backend 'nope'; available: broken, echo, fake, hf, missing, vllm"
    )
    with pytest.raises(UserError) as exc:
        build_backend("broken", **kw)
    assert str(exc.value) == (
        "sampling backend 'broken' (stableopd_echo_plugin:NotABackend) does not implement generate/sync_weights"
    )
    with pytest.raises(UserError) as exc:
        build_backend("missing", **kw)
    assert (
        str(exc.value)
        == "sampling backend 'missing' cannot be imported (No module named 'stableopd_no_such_module')"
    )


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generation_config_is_valid_for_transformers(tiny, temperature):
    # transformers warns on every generate() of an invalid config (greedy with a sampling knob set)
    params = SamplingParams(n=1, temperature=temperature, top_k=5, max_new_tokens=4, seed=0)
    hf_backend(tiny)._gen_config(params).validate(strict=True)


class SizedBackend:
    """Answers every prompt with one stopped one-token sample, recording the prompts per call."""

    name = "sized"

    def __init__(self, per_call: int | None = None) -> None:
        self.calls: list[int] = []
        if per_call is not None:
            self.prompts_per_call = per_call

    def generate(self, prompts_P, params):
        self.calls.append(len(prompts_P))
        return [[Sample([2], [0.0], "stop")] * params.n for _ in prompts_P]

    def sync_weights(self, model) -> None:
        pass


@pytest.mark.parametrize("per_call, progress, calls", [
    (None, False, [19]),  # no bar: one call, the backend batches
    (None, True, [8, 8, 3]),  # a bar and no preference: 8 prompts per call
    (5, True, [5, 5, 5, 4]),  # the backend's prompts_per_call
    (5, False, [19]),
])  # fmt: skip
def test_sample_records_hands_the_backend_its_batch(tiny, per_call, progress, calls):
    backend = SizedBackend(per_call)
    exs = [Example(id=f"q{i}", prompt=f"{i}+1=") for i in range(19)]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=0)
    records = sample_records(
        backend,
        tiny.tokenizer,
        exs,
        [[5, 6]] * 19,
        params,
        [2],
        rep_tail_chars=48,
        rep_ratio=1.5,
        progress=progress,
    )
    assert backend.calls == calls
    assert [(r.prompt_id, r.sample_idx) for r in records] == [(f"q{i}", j) for i in range(19) for j in (0, 1)]


def test_hf_backend_prompts_per_call_is_its_batch_size(tiny):
    assert hf_backend(tiny, batch_size=3).prompts_per_call == 3


def test_the_fake_test_sampler_keeps_the_backend_contract(tiny, fake_backend):
    """tests/fake_backend.py stands in for hf in the run-machinery tests: registered like a plugin, seeded,
    never drawing a banned id, "length" exactly when the budget is used up, and log-probs that are the
    model's own (what the trainer's sampler/trainer agreement check reads)."""
    from stableopd.engine.teacher import score_targets

    stops = stop_token_ids(tiny.tokenizer, tiny.model)
    backend = build_backend(fake_backend, model=tiny.model, tokenizer=tiny.tokenizer, model_path="",
                            stop_ids=stops, options={})  # fmt: skip
    prompts = encode_prompts(tiny.tokenizer, [Example(str(i), f"{i}+{i}=") for i in range(6)])
    params = SamplingParams(n=3, max_new_tokens=9, seed=5, banned_token_ids=(7, 8))
    batch = backend.generate(prompts, params)
    assert [len(s) for s in batch] == [3] * 6 and batch == backend.generate(prompts, params)
    samples = [s for row in batch for s in row]
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    for s in samples:
        assert (s.finish_reason == "length") == (len(s.token_ids) == 9 and s.token_ids[-1] not in stops)
        assert not {7, 8} & set(s.token_ids) and all(t not in stops for t in s.token_ids[:-1])
    want = score_targets(tiny.model, [p for p in prompts for _ in range(3)], [s.token_ids for s in samples],
                         pad_id=0, micro_batch=4, chunk_size=64, vocab_size=len(tiny.tokenizer))  # fmt: skip
    for s, w in zip(samples, want):
        assert s.logprobs == pytest.approx(w, abs=1e-5)


def test_a_rollout_record_reads_back_from_its_line(tiny):
    """The typed record and the records file's line are one thing: the stop token trained after the response,
    the file's keys in the record's order, `answer` only when there is one, stage fields last."""
    sample = Sample(token_ids=[5, 6, 2], logprobs=[-0.5, -0.25, -0.125], finish_reason="stop")
    ex = Example("q1", "1+1=", answer="2")
    rec = make_record(ex, [9, 9], 0, sample, tiny.tokenizer, [2], rep_tail_chars=48, rep_ratio=1.5)
    assert (rec.target, rec.target_logprobs) == ([5, 6, 2], [-0.5, -0.25, -0.125])
    assert (rec.response_token_ids, rec.stop_token_id, rec.truncated) == ([5, 6], 2, False)
    rec.extra.update(step=3, correct=True)
    row = json.loads(json.dumps(rec.to_json()))
    assert list(row)[-4:] == ["stop_logprob", "answer", "step", "correct"] and list(row)[0] == "prompt_id"
    assert Rollout.from_json(row) == rec
    cut = make_record(Example("q2", "x"), [9], 1, Sample([5, 6], [-1.0, -2.0], "length"), tiny.tokenizer, [2],
                      rep_tail_chars=48, rep_ratio=1.5)  # fmt: skip
    assert cut.target == [5, 6] and cut.truncated and "answer" not in cut.to_json()
