"""Model loading: the tiny family, name resolution and its errors, and the student/teacher pre-flight checks."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from stableopd.errors import UserError
from stableopd.models import loading as models
from stableopd.models.loading import Loaded, check_compatible, load_model, resolve_model_path, stop_token_ids
from stableopd.models.tiny import CHAT_TEMPLATE, build_tiny_model, build_tokenizer


def weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# The tiny family


@pytest.mark.parametrize("fixture", ["tiny", "tiny_teacher"])
def test_tiny_is_a_plain_hugging_face_directory(fixture, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(loaded.path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(loaded.path, local_files_only=True)
    assert model.config.model_type == "llama"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)


def test_tiny_members_differ_in_size_and_weights(tiny, tiny_teacher):
    cs, ct = tiny.model.config, tiny_teacher.model.config
    assert (cs.hidden_size, cs.num_hidden_layers) == (64, 2)
    assert (ct.hidden_size, ct.num_hidden_layers) == (96, 3)
    assert tiny.model.get_output_embeddings().weight.shape[0] == 128
    assert tiny_teacher.model.get_output_embeddings().weight.shape[0] == 136
    assert sum(p.numel() for p in tiny.model.parameters()) < sum(
        p.numel() for p in tiny_teacher.model.parameters()
    )


def test_tiny_build_is_deterministic(tmp_path, tiny):
    a = weights(build_tiny_model("tiny", tmp_path / "a"))
    b = weights(build_tiny_model("tiny", tmp_path / "b"))
    cached = weights(tiny.path)
    assert a.keys() == b.keys() == cached.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], cached[key]), key


def test_tiny_build_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_model("tiny", tmp_path / "m")
    assert torch.equal(torch.rand(4), expected)


def test_seed_changes_the_weights(tmp_path):
    spec = dataclasses.replace(models.TINY_FAMILY["tiny"], seed=7)
    other = weights(build_tiny_model("tiny", tmp_path / "s7", spec=spec))
    base = weights(build_tiny_model("tiny", tmp_path / "s0"))
    assert not torch.equal(other["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "text", ["hello world", "  two  spaces\n\nnew lines\tand a tab ", "x", "12+345=357\nThe answer is 357."]
)
def test_tokenizer_round_trips_text(tiny, text):
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tiny.tokenizer.decode(ids) == text


def test_tokenizer_has_chat_template_and_a_real_eos(tiny):
    tok = tiny.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") != tok.pad_token_id
    assert tok.padding_side == "left"
    assert stop_token_ids(tok, tiny.model) == [tok.eos_token_id]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the special tokens are single ids, never split into characters
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


def test_stop_token_ids_merge_the_generation_config():
    tok = SimpleNamespace(eos_token_id=2)
    assert stop_token_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))) == [
        2,
        7,
    ]
    assert stop_token_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9))) == [2, 9]
    assert stop_token_ids(tok, None) == [2]


def test_builtin_is_built_once_and_reused(tiny, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached built-in")

    monkeypatch.setattr(models, "build_tiny_model", fail)
    assert resolve_model_path("tiny") == tiny.path


def test_atomic_build_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "models" / "thing"

    def broken(d: Path) -> None:
        (d / "half.bin").write_text("x")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        models._atomic_build(target, broken)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".thing.lock"]  # no entry, no temp dir

    calls = []

    def good(d: Path) -> None:
        calls.append(d)
        (d / "w.bin").write_text("ok")

    assert models._atomic_build(target, good) == target
    assert models._atomic_build(target, good) == target
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == ["COMPLETE", "w.bin"]


def test_atomic_build_replaces_an_incomplete_directory(tmp_path):
    target = tmp_path / "thing"
    target.mkdir()
    (target / "stale.bin").write_text("old")  # no COMPLETE marker: an interrupted older build
    models._atomic_build(target, lambda d: (d / "new.bin").write_text("new"))
    assert sorted(p.name for p in target.iterdir()) == ["COMPLETE", "new.bin"]


# ------------------------------------------------------------------------------------------------
# Pre-flight checks


def with_tokenizer(loaded: Loaded, tokenizer, name: str = "other") -> Loaded:
    return Loaded(name=name, path=loaded.path, model=loaded.model, tokenizer=tokenizer)


def permuted_tokenizer():
    """Same tokens as tiny's, two of them swapped: same size, different ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = build_tokenizer().get_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_padded_rows_differ_but_shared_vocab_is_returned(tiny, tiny_teacher):
    assert check_compatible(tiny, tiny_teacher, chat_template=True) == len(tiny.tokenizer) == 101


def test_permuted_vocabulary_is_rejected(tiny, tiny_teacher):
    bad = with_tokenizer(tiny_teacher, permuted_tokenizer(), name="swapped")
    assert len(bad.tokenizer) == len(tiny.tokenizer)
    with pytest.raises(UserError) as exc:
        check_compatible(tiny, bad, chat_template=True)
    assert str(exc.value) == (
        "student 'tiny' and reference 'swapped' have different tokenizer vocabularies "
        "(101 vs 101 base tokens, 4 entries differ); pick models of the same family"
    )


def test_eos_mismatch_is_rejected(tiny, tiny_teacher):
    tok = build_tokenizer()
    tok.eos_token = "<|im_start|>"
    with pytest.raises(UserError) as exc:
        check_compatible(tiny, with_tokenizer(tiny_teacher, tok), chat_template=True)
    assert str(exc.value) == (
        "student and reference end sequences with different tokens ('<|im_end|>' vs '<|im_start|>'); "
        "lengths would inflate"
    )


def test_pad_mismatch_is_rejected(tiny, tiny_teacher):
    tok = build_tokenizer()
    tok.pad_token = "<|unk|>"
    with pytest.raises(UserError, match=r"different padding ids \(0 vs 3\)"):
        check_compatible(tiny, with_tokenizer(tiny_teacher, tok), chat_template=True)


def test_missing_chat_template_only_matters_when_used(tiny, tiny_teacher):
    tok = build_tokenizer()
    tok.chat_template = None
    raw = with_tokenizer(tiny_teacher, tok, name="raw")
    with pytest.raises(UserError) as exc:
        check_compatible(tiny, raw, chat_template=True, role_b="reference")
    assert str(exc.value) == (
        "reference 'raw' has no chat template; set data.chat_template=false to send raw prompts"
    )
    assert check_compatible(tiny, raw, chat_template=False) == 101


def test_too_few_output_rows_is_rejected(tiny):
    head = torch.nn.Linear(4, 50, bias=False)
    small = Loaded(
        name="small",
        path="x",
        model=SimpleNamespace(get_output_embeddings=lambda: head),
        tokenizer=tiny.tokenizer,
    )
    with pytest.raises(UserError, match="reference 'small' has 50 output rows for a 101-token vocabulary"):
        check_compatible(tiny, small, chat_template=True)


@pytest.mark.slow
def test_smollm2_and_tiny_are_incompatible(tiny, smollm2):
    with pytest.raises(UserError, match="different tokenizer vocabularies .101 vs 49152 base tokens"):
        check_compatible(tiny, smollm2, chat_template=True)


@pytest.mark.slow
def test_smollm2_is_converted_from_the_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(smollm2.path, local_files_only=True)
    assert again.config.model_type == "llama"
    assert smollm2.tokenizer.eos_token == "<|im_end|>"
    assert smollm2.tokenizer.chat_template
    assert (Path(smollm2.path) / "COMPLETE").is_file()


# ------------------------------------------------------------------------------------------------
# Name resolution errors


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(UserError) as exc:
        load_model("tinyy")
    assert str(exc.value) == (
        "unknown model 'tinyy': use a Hugging Face id (org/name), a local path, or one of tiny, tiny-teacher, "
        "arith-teacher, arith-student, collapse-teacher, collapse-student, "
        "smollm2-135m, qwen-1.5b, qwen-7b, qwen-math-1.5b, qwen-math-7b, r1-distill-7b, openthinker3-7b"
    )


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_missing_local_path(name):
    with pytest.raises(UserError) as exc:
        load_model(name)
    assert str(exc.value) == f"model path '{name}' does not exist"


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(UserError) as exc:
        load_model(str(tmp_path))
    assert str(exc.value) == f"'{tmp_path}' exists but is not a Hugging Face model directory (no config.json)"


@pytest.mark.parametrize(
    "damage", ["no weights", "weights cut short", "config not JSON", "tokenizer unreadable"]
)
def test_a_damaged_model_directory_is_one_line_naming_what_is_wrong(tmp_path, damage):
    path = build_tiny_model("tiny", tmp_path / "model")
    if damage == "no weights":
        (path / "model.safetensors").unlink()
    elif damage == "weights cut short":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:4000])
    elif damage == "config not JSON":
        (path / "config.json").write_text("{not json")
    else:
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    with pytest.raises(UserError) as exc:
        load_model(str(path), device="cpu")
    what = "tokenizer" if damage in ("config not JSON", "tokenizer unreadable") else "model"
    assert str(exc.value).startswith(f"cannot load the {what} of '{path}': ")
    assert "\n" not in str(exc.value)
    if damage == "no weights":
        assert "the directory holds no weights" in str(exc.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ImportError(
                "LlamaTokenizer requires the SentencePiece library but it was not found in your environment."
            ),
            "it needs a package that is not installed (pip install sentencepiece)",
        ),
        (
            ValueError(
                "`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`."
            ),
            "it needs a package that is not installed (pip install tiktoken)",
        ),
        (
            OSError("Error no file named model.safetensors, or pytorch_model.bin, found in directory /m."),
            "the directory holds no weights (Error no file named model.safetensors, or pytorch_model.bin, found in "
            "directory /m.)",
        ),
        (
            ValueError("Unrecognized model in /m. Should have a `model_type` key\nin its config.json"),
            "Unrecognized model in /m. Should have a `model_type` key in its config.json",
        ),
        (
            ValueError(
                "The checkpoint you are trying to load has model type `x` but Transformers does not recognize "
                "it. You can update Transformers with the command `pip install --upgrade transformers`."
            ),
            "it needs a newer package (pip install --upgrade transformers): The checkpoint you are trying to load has "
            "model type `x` but Transformers does not recognize it. You can update Transformers with the command "
            "`pip install --upgrade transformers`.",
        ),
    ],
)
def test_load_failures_say_what_is_missing(error, expected):
    assert models.load_failure("/m", "tokenizer", error) == f"cannot load the tokenizer of '/m': {expected}"


def test_local_directory_loads_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = build_tiny_model("tiny", tmp_path / "copy")
    loaded = load_model(str(path), device="cpu")
    assert loaded.path == str(path) and loaded.model.config.hidden_size == 64
    assert loaded.model.dtype == torch.float32 and not loaded.model.training


def test_hub_id_offline_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    start = time.monotonic()
    with pytest.raises(UserError) as exc:
        load_model("stableopd-tests/no-such-model")
    assert time.monotonic() - start < 30
    assert str(exc.value) == (
        "model 'stableopd-tests/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
        "download it on a connected machine or pass a local directory"
    )


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UserError) as exc:
        load_model(str(tmp_path / "model.gguf"))
    assert str(exc.value) == f"GGUF file '{tmp_path / 'model.gguf'}' does not exist"


def test_corrupt_gguf_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00junk")
    with pytest.raises(UserError) as exc:
        load_model(str(path))
    assert str(exc.value).startswith(f"cannot convert GGUF file '{path}' (")
    assert "\n" not in str(exc.value)
    assert not any(
        p.name.startswith("gguf-broken") and (p / "COMPLETE").exists()
        for p in (models.cache_dir() / "models").iterdir()
    )


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as exc:
        models.resolve_device("cuda:0")
    assert (
        str(exc.value) == "device 'cuda:0' requested but no CUDA device is available; use device=cpu or auto"
    )
    assert models.resolve_device("auto") == "cpu"


def test_auto_dtype():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16


def test_load_model_honours_dtype(tmp_path):
    loaded = load_model("tiny", dtype="bfloat16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16
