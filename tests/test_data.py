"""Prompt data: file formats, renamed fields, limit/shuffle, the errors users see, and prompt encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stableopd.data.sources import Fields, encode_prompt, encode_prompts, load_examples
from stableopd.errors import UserError
from stableopd.types import Example

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
    expected = {
        "directory": "is a directory, not a file",
        "pipe": "is a pipe, not a file",
        "device": "is a device, not a file",
        "dangling link": "does not exist",
    }[kind]
    assert str(exc.value) == f"data file '{path}' {expected}"


def test_data_file_and_line_limits_name_the_key_to_raise(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "x" * (2 << 20)}, ROWS[1]])
    with pytest.raises(UserError) as exc:
        load_examples(str(path), max_line_mb=1)
    assert str(exc.value) == f"{path}:1: line longer than 1 MiB; raise data.max_line_mb if the file is right"
    with pytest.raises(UserError) as exc:
        load_examples(str(path), max_file_mb=1)
    assert (
        str(exc.value)
        == f"data file '{path}' is 2 MiB, over the 1 MiB limit; raise data.max_file_mb to read it"
    )
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


# ------------------------------------------------------------------------------------------------
# Golden solutions from list fields (OpenR1-Math-220k) and data.max_solution_tokens

OPENR1 = dict(id="uuid", prompt="problem", answer="answer", solution="generations")
FLAGS = "correctness_math_verify"
FIT = "x" * 31 + "\\boxed{9}"  # 40 characters: 40 tokens for tiny's one-id-per-character tokenizer
OVER = "y" * 32 + "\\boxed{4}"  # 41
# uuid -> (generations, correctness_math_verify, correctness_llama)
TRACES = {
    "u0": (["1+1=2 \\boxed{2}", "one and one \\boxed{2}"], [True, True], [True, True]),
    "u1": (["2*3=5 \\boxed{5}", "2*3=6 \\boxed{6}"], [False, True], None),  # the second one is verified
    "u2": (["guess \\boxed{7}", "guess \\boxed{8}"], [False, False], [False, None]),  # none verified: dropped
    "u3": ([OVER, "short \\boxed{4}"], [True, False], [True, False]),  # its verified trace is over 40 tokens
    "u4": (["a \\boxed{1}", "b \\boxed{1}", FIT], [False, False, True], None),  # exactly 40 tokens: kept
    "u5": (
        ["c \\boxed{3}", "d \\boxed{3}", "e \\boxed{3}", "f \\boxed{3}"],
        [True, False, True, False],
        [True, True, None, False],
    ),
}
SELECTED = {
    "u0": "1+1=2 \\boxed{2}",
    "u1": "2*3=6 \\boxed{6}",
    "u2": None,
    "u3": OVER,
    "u4": FIT,
    "u5": "c \\boxed{3}",
}


def write_openr1(path: Path) -> Path:
    """A Parquet file with OpenR1-Math-220k's field names and Arrow types, one row per TRACES entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("problem", pa.string()),
            ("solution", pa.string()),
            ("answer", pa.string()),
            ("problem_type", pa.string()),
            ("question_type", pa.string()),
            ("source", pa.string()),
            ("uuid", pa.string()),
            ("is_reasoning_complete", pa.list_(pa.bool_())),
            ("generations", pa.list_(pa.string())),
            (FLAGS, pa.list_(pa.bool_())),
            ("correctness_llama", pa.list_(pa.bool_())),
            ("finish_reasons", pa.list_(pa.string())),
            ("correctness_count", pa.int64()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ]
    )
    rows = [
        {
            "problem": f"problem {uid}?",
            "solution": f"numina {uid}",
            "answer": uid[1],
            "uuid": uid,
            "problem_type": "Algebra",
            "question_type": "math-word-problem",
            "source": "olympiads",
            "is_reasoning_complete": [True] * len(gens),
            "generations": gens,
            FLAGS: flags,
            "correctness_llama": llama,
            "finish_reasons": None if llama is None else ["stop"] * len(gens),
            "correctness_count": sum(flags),
            "messages": [
                {"role": "user", "content": f"problem {uid}?"},
                {"role": "assistant", "content": gens[0]},
            ],
        }
        for uid, (gens, flags, llama) in TRACES.items()
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_openr1_verified_trace_is_the_first_one_flagged_true(tmp_path):
    examples = load_examples(
        str(write_openr1(tmp_path / "openr1.parquet")), fields=Fields(**OPENR1, solution_correct=FLAGS)
    )
    assert {e.id: e.solution for e in examples} == SELECTED
    assert [(e.prompt, e.answer) for e in examples] == [(f"problem {u}?", u[1]) for u in TRACES]


def test_openr1_drops_unverified_and_over_long_traces(tmp_path):
    from stableopd.data.sources import keep_for_training, kept_note, solution_ids
    from stableopd.models.tiny import build_tokenizer

    tok = build_tokenizer()
    examples = load_examples(
        str(write_openr1(tmp_path / "openr1.parquet")), fields=Fields(**OPENR1, solution_correct=FLAGS)
    )
    n_tokens = [None if ids is None else len(ids) for ids in solution_ids(tok, examples)]
    assert n_tokens == [None if s is None else len(s) for s in SELECTED.values()]  # one id per character
    kept = keep_for_training(examples, n_tokens, verified_only=True, max_tokens=40)
    assert [e.id for e in kept.examples] == ["u0", "u1", "u4", "u5"]
    assert (kept.total, kept.unverified, kept.too_long) == (6, 1, 1)
    assert kept_note(kept, verified_only=True, max_tokens=40) == (
        "data: kept 4 of 6 training examples (dropped 1 with no verified solution, 1 with a solution over "
        "40 tokens)"
    )
    longer = keep_for_training(examples, n_tokens, verified_only=True, max_tokens=41)  # the limit is kept
    assert [e.id for e in longer.examples] == ["u0", "u1", "u3", "u4", "u5"] and longer.too_long == 0
    shorter = keep_for_training(examples, n_tokens, verified_only=True, max_tokens=39)
    assert [e.id for e in shorter.examples] == ["u0", "u1", "u5"] and shorter.too_long == 2


def test_keep_for_training_rules_apply_one_at_a_time():
    from stableopd.data.sources import keep_for_training, kept_note

    examples = [Example("a", "p", solution="s" * 5), Example("b", "p"), Example("c", "p", solution="s" * 9)]
    n_tokens = [5, None, 9]
    only_long = keep_for_training(examples, n_tokens, verified_only=False, max_tokens=8)
    assert [e.id for e in only_long.examples] == ["a", "b"]  # without the verified rule, no solution is kept
    assert kept_note(only_long, verified_only=False, max_tokens=8) == (
        "data: kept 2 of 3 training examples (dropped 1 with a solution over 8 tokens)"
    )
    only_verified = keep_for_training(examples, None, verified_only=True, max_tokens=None)
    assert [e.id for e in only_verified.examples] == ["a", "c"]
    assert kept_note(only_verified, verified_only=True, max_tokens=None) == (
        "data: kept 2 of 3 training examples (dropped 1 with no verified solution)"
    )
    many = [Example(f"e{i}", "p", solution="s") for i in range(1500)] + [Example("x", "p")]
    kept = keep_for_training(many, None, verified_only=True, max_tokens=None)
    assert kept_note(kept, verified_only=True, max_tokens=None) == (
        "data: kept 1,500 of 1,501 training examples (dropped 1 with no verified solution)"
    )


def test_keep_for_training_that_keeps_nothing_names_both_keys():
    from stableopd.data.sources import keep_for_training

    examples = [Example("a", "p"), Example("b", "p", solution="long one")]
    with pytest.raises(UserError) as exc:
        keep_for_training(examples, [None, 8], verified_only=True, max_tokens=4)
    assert str(exc.value) == (
        "data: no training example kept of 2 (1 with no verified solution, 1 with a solution over 4 tokens); "
        "check data.solution_correct_field or raise data.max_solution_tokens"
    )


def test_list_solution_without_flags_is_its_first_non_empty_string(tmp_path):
    rows = [
        {"id": "a", "prompt": "p", "solution": ["", None, "first", "second"]},
        {"id": "b", "prompt": "p", "solution": ["", None]},
        {"id": "c", "prompt": "p", "solution": []},
        {"id": "d", "prompt": "p", "solution": "plain text"},
    ]
    assert [e.solution for e in load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)))] == [
        "first",
        None,
        None,
        "plain text",
    ]


def test_null_flags_and_text_solutions_are_not_verified(tmp_path):
    rows = [
        {"id": "a", "prompt": "p", "g": ["x", "y"], "ok": [None, True]},
        {"id": "b", "prompt": "p", "g": ["x", "y"], "ok": None},
        {"id": "c", "prompt": "p"},  # no solution at all (a validation set): no error, no solution
        {"id": "d", "prompt": "p", "g": "text"},
    ]  # MATH-500's `solution` read with a paper run's keys
    fields = Fields(solution="g", solution_correct="ok")
    examples = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), fields=fields)
    assert [e.solution for e in examples] == ["y", None, None, None]


def test_list_answer_keeps_the_form_normalize_gold_reads(tmp_path):
    from stableopd.eval.answers import normalize_gold

    rows = [{"id": "a", "prompt": "p", "final_answer": ["$\\frac12$"]}]  # OlympiadBench's answers
    [ex] = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), fields=Fields(answer="final_answer"))
    assert ex.answer == "['$\\\\frac12$']" and normalize_gold(ex.answer) == "\\frac12"


GOOD = {"id": "a", "prompt": "p", "answer": "1", "g": ["x", "y"], "ok": [False, True]}


@pytest.mark.parametrize(
    "bad, flags, message",
    [
        (
            {"prompt": ["p"]},
            None,
            "field 'prompt' is a list, not text; set data.prompt_field to a text field",
        ),
        ({"id": ["b"]}, None, "field 'id' is a list, not text; set data.id_field to a text field"),
        (
            {"answer": {"v": 1}},
            None,
            "field 'answer' is a dict, not text; set data.answer_field to a text field",
        ),
        (
            {"ok": True},
            "ok",
            "field 'ok' is a bool, not a list of booleans; check data.solution_correct_field",
        ),
        (
            {"ok": [True]},
            "ok",
            "'ok' has 1 flags for 2 items of 'g'; data.solution_correct_field must name the list parallel to "
            "data.solution_field",
        ),
        (
            {"ok": [False, "true"]},
            "ok",
            "flag 1 of 'ok' is a str, not a boolean; check data.solution_correct_field",
        ),
        ({"ok": [0, 1]}, "ok", "flag 0 of 'ok' is a int, not a boolean; check data.solution_correct_field"),
        ({"g": {"x": 1}}, None, "field 'g' is a dict, not text or a list of text; check data.solution_field"),
        (
            {"g": [{"role": "user"}]},
            None,
            "item 0 of field 'g' is a dict, not text; set data.solution_field to a list of strings",
        ),
    ],
)
def test_list_field_errors_name_the_row_the_field_and_the_key(tmp_path, bad, flags, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "id": "b", **bad}])
    with pytest.raises(UserError) as exc:
        load_examples(str(path), fields=Fields(solution="g", solution_correct=flags))
    assert str(exc.value) == f"{path}: row 1: {message}"


def test_missing_flags_field_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"id": "b", "prompt": "p", "g": ["x"]}])
    with pytest.raises(UserError) as exc:
        load_examples(str(path), fields=Fields(solution="g", solution_correct="ok"))
    assert str(exc.value) == (
        f"{path}: row 1 has no 'ok' field (fields: id, prompt, g); set data.solution_correct_field"
    )


def test_text_fields_read_as_before_with_the_new_keys_unset(tmp_path):
    rows = [
        {"id": 3, "prompt": 12, "answer": 2.5, "solution": 7},
        {"prompt": None, "answer": "", "solution": ""},
    ]
    assert load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows))) == [
        Example(id="3", prompt="12", answer="2.5", solution="7"),
        Example(id="1", prompt="None"),
    ]


def openr1_config(path: Path, *overrides: str):
    from stableopd.config import load_config

    return load_config(
        None,
        ["train.eval_every=0", "student.device=cpu", "data.shuffle=false", *overrides],
        {"data.source": str(path), "data.id_field": "uuid", "data.prompt_field": "problem"},
    )


def test_prepare_trains_on_kept_examples_only(tmp_path, tiny, monkeypatch):
    from stableopd.data import sources
    from stableopd.stages import training

    notes = []
    monkeypatch.setattr(training, "note", lambda message, enabled=True: notes.append((message, enabled)))
    monkeypatch.delenv("RANK", raising=False)
    path = write_openr1(tmp_path / "openr1.parquet")
    cfg = openr1_config(
        path,
        "data.solution_field=generations",
        f"data.solution_correct_field={FLAGS}",
        "data.max_solution_tokens=40",
    )
    setup = training.prepare(cfg, student_path=None, need_teacher=False, need_ref=False)
    assert [e.id for e in setup.train] == ["u0", "u1", "u4", "u5"]
    assert [e.solution for e in setup.train] == [SELECTED[u] for u in ("u0", "u1", "u4", "u5")]
    tok = setup.student.tokenizer
    assert setup.train_ids == [encode_prompt(tok, f"problem {u}?") for u in ("u0", "u1", "u4", "u5")]
    golds = sources.gold_targets(tok, setup.train, setup.stop_ids[0])
    assert [len(g) for g in golds] == [len(SELECTED[u]) + 1 for u in ("u0", "u1", "u4", "u5")]
    assert setup.golds == golds  # the ids tokenised for the length rule are the ones training uses
    assert (
        "data: kept 4 of 6 training examples (dropped 1 with no verified solution, 1 with a solution "
        "over 40 tokens)",
        True,
    ) in notes
    quiet = openr1_config(
        path,
        "data.solution_field=generations",
        f"data.solution_correct_field={FLAGS}",
        "logging.progress=false",
    )
    notes.clear()
    setup = training.prepare(quiet, student_path=None, need_teacher=False, need_ref=False)
    assert [e.id for e in setup.train] == ["u0", "u1", "u3", "u4", "u5"]  # no token limit: u3 stays
    assert [enabled for m, enabled in notes if m.startswith("data:")] == [False]


def test_prepare_is_unchanged_with_the_new_keys_unset(tmp_path, tiny, monkeypatch):
    from stableopd.stages import training

    notes = []
    monkeypatch.setattr(training, "note", lambda message, enabled=True: notes.append(message))
    path = write_openr1(tmp_path / "openr1.parquet")
    cfg = openr1_config(path)  # the NuminaMath `solution` string, every row
    setup = training.prepare(cfg, student_path=None, need_teacher=False, need_ref=False)
    assert setup.train == load_examples(str(path), fields=Fields(id="uuid", prompt="problem"))
    assert [e.solution for e in setup.train] == [f"numina {u}" for u in TRACES]
    assert not [m for m in notes if m.startswith("data:")]
