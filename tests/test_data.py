"""Prompt data: file formats, renamed fields, limit/shuffle, the errors users see, and prompt encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stableopd.data import Example, Fields, encode_prompt, encode_prompts, load_examples
from stableopd.errors import UserError

ROWS = [
    {"id": "a", "prompt": "one", "answer": "1", "solution": "s1"},
    {"id": "b", "prompt": "two", "answer": 2},
    {"id": "c", "prompt": "three", "answer": "", "solution": None},
]
EXPECTED = [
    Example(id="a", prompt="one", answer="1", solution="s1"),
    Example(id="b", prompt="two", answer="2", solution=None),
    Example(id="c", prompt="three", answer=None, solution=None),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    assert load_examples(str(write_jsonl(tmp_path / "d.jsonl", ROWS))) == EXPECTED


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n   \n" + json.dumps(ROWS[1]) + "\n\n", encoding="utf-8")
    assert load_examples(str(path)) == EXPECTED[:2]


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_examples(str(path)) == EXPECTED


def test_parquet(tmp_path):
    import pyarrow as pa  # a dev dependency
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"id": r["id"], "prompt": r["prompt"], "answer": str(r["answer"])} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_examples(str(path)) == [
        Example("a", "one", "1"),
        Example("b", "two", "2"),
        Example("c", "three", None),
    ]


def test_prompts_fixture_is_readable(prompts_file):
    examples = load_examples(str(prompts_file))
    assert [e.id for e in examples] == ["p-short", "p-long", "p-mid"]
    assert examples[2].answer is None


def test_renamed_fields(tmp_path):
    rows = [{"qid": 7, "question": "q?", "final": "42", "golden": "work", "prompt": "ignored"}]
    fields = Fields(id="qid", prompt="question", answer="final", solution="golden")
    assert load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), fields=fields) == [
        Example(id="7", prompt="q?", answer="42", solution="work")
    ]


def test_missing_id_falls_back_to_the_row_index(tmp_path):
    rows = [{"prompt": "x"}, {"prompt": "y"}]
    assert [e.id for e in load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)))] == ["0", "1"]


def test_limit_and_shuffle_are_deterministic(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"p{i}"} for i in range(50)]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.id for e in load_examples(path, limit=3)] == ["r0", "r1", "r2"]
    a = load_examples(path, shuffle=True, seed=1)
    assert a == load_examples(path, shuffle=True, seed=1)
    assert a != load_examples(path, shuffle=True, seed=2)
    assert sorted(e.id for e in a) == sorted(r["id"] for r in rows) and [e.id for e in a] != [
        r["id"] for r in rows
    ]
    # shuffle happens before limit: the limited list is the head of the shuffled one
    assert load_examples(path, shuffle=True, seed=1, limit=5) == a[:5]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"id": "x", "prompt": }\n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"{path}:3: not valid JSON (Expecting value); fix or remove that line"


def test_data_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"id": "x", "prompt": "caf\xe9"}\n')
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"{path}:2: not UTF-8 text (byte 27 of the line); save the file as UTF-8"


@pytest.mark.parametrize("kind", ["directory", "pipe", "device", "dangling link"])
def test_data_path_that_is_not_a_regular_file_fails_before_reading(tmp_path, kind):
    path = tmp_path / "d.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)  # opening it would block until a writer came: it must never be opened
    elif kind == "device":
        path = Path("/dev/zero")  # reading it would grow without end
    else:
        path.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    expected = {"directory": "is a directory, not a file", "pipe": "is a pipe, not a file",
                "device": "is a device, not a file", "dangling link": "does not exist"}[kind]
    assert str(exc.value) == f"data file '{path}' {expected}"


def test_data_file_and_line_limits_name_the_key_to_raise(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "x" * (2 << 20)}, ROWS[1]])
    with pytest.raises(UserError) as exc:
        load_examples(str(path), max_line_mb=1)
    assert str(exc.value) == f"{path}:1: line longer than 1 MiB; raise data.max_line_mb if the file is right"
    with pytest.raises(UserError) as exc:
        load_examples(str(path), max_file_mb=1)
    assert str(exc.value) == f"data file '{path}' is 2 MiB, over the 1 MiB limit; raise data.max_file_mb to read it"
    assert [e.id for e in load_examples(str(path), max_line_mb=3)] == ["a", "b"]
    exact = tmp_path / "exact.jsonl"  # a line of exactly the limit (newline excluded) is read
    line = json.dumps({"prompt": ""})
    exact.write_text(json.dumps({"prompt": "y" * ((1 << 20) - len(line))}) + "\n")
    assert len(exact.read_bytes()) == (1 << 20) + 1
    assert len(load_examples(str(exact), max_line_mb=1)[0].prompt) == (1 << 20) - len(line)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"{path}:2: expected a JSON object, got list"


@pytest.mark.parametrize("content", ['{"rows": []}', "[1, 2]", '["a"]'])
def test_json_that_is_not_a_list_of_objects(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"{path}: expected a JSON list of objects"


def test_invalid_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n{oops}\n]")
    with pytest.raises(UserError, match=r"not valid JSON \(.* at line 2\)"):
        load_examples(str(path))


def test_missing_prompt_field_suggests_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "question": "q"}])
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert (
        str(exc.value) == f"{path}: row 0 has no 'prompt' field (fields: id, question); set data.prompt_field"
    )


def test_duplicate_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}],
    )
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"data source '{path}' has duplicate id 'a'; ids must be unique"


def test_ids_are_compared_as_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "x"}, {"id": "1", "prompt": "y"}])
    with pytest.raises(UserError, match="duplicate id '1'"):
        load_examples(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as exc:
        load_examples(str(path))
    assert str(exc.value) == f"data source '{path}' holds no examples"


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "./missing", "/no/such/file.json"])
def test_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as exc:
        load_examples(name)
    assert str(exc.value) == f"data file '{name}' does not exist"


# ------------------------------------------------------------------------------------------------
# Prompt encoding (tiny's tokenizer: one id per character, special tokens are single ids)


def naive_ids(tok, *pieces: str) -> list[int]:
    """Special tokens as whole pieces, everything else character by character."""
    vocab = tok.get_vocab()
    out: list[int] = []
    for piece in pieces:
        out.extend([vocab[piece]] if piece in vocab and len(piece) > 1 else [vocab[c] for c in piece])
    return out


def test_encode_prompt_with_chat_template(tiny):
    tok = tiny.tokenizer
    expected = naive_ids(
        tok, "<|im_start|>", "user\nWhat is 2+2?", "<|im_end|>", "\n", "<|im_start|>", "assistant\n"
    )
    assert encode_prompt(tok, "What is 2+2?") == expected


def test_encode_prompt_with_system_prompt(tiny):
    tok = tiny.tokenizer
    expected = naive_ids(
        tok,
        "<|im_start|>",
        "system\nBe brief.",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "user\nhi",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        "assistant\n",
    )
    assert encode_prompt(tok, "hi", system_prompt="Be brief.") == expected


def test_encode_prompt_without_chat_template(tiny):
    tok = tiny.tokenizer
    ids = encode_prompt(tok, "a b\nc", chat_template=False, system_prompt="ignored")
    assert ids == naive_ids(tok, "a b\nc")
    assert all(isinstance(i, int) for i in ids)


def test_encode_prompts_enforces_the_token_limit(tiny):
    examples = [Example("ok", "hi"), Example("long-one", "x" * 40)]
    ids = encode_prompts(tiny.tokenizer, examples[:1], max_tokens=25)
    assert ids == [encode_prompt(tiny.tokenizer, "hi")] and len(ids[0]) == 21
    assert encode_prompts(tiny.tokenizer, examples[:1], max_tokens=21) == ids  # the limit itself is allowed
    with pytest.raises(UserError) as exc:
        encode_prompts(tiny.tokenizer, examples, max_tokens=25)
    assert str(exc.value) == (
        "prompt 'long-one' is 59 tokens, over data.max_prompt_tokens=25; raise the limit or drop the prompt"
    )
