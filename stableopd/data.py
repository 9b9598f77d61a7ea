"""Prompts: local JSONL/JSON/Parquet files, the built-in `builtin:arith` world, or Hugging Face datasets.

Every source yields `Example(id, prompt, answer, solution)`; field names are renameable (defaults `id`,
`prompt`, `answer`, `solution`, the last being the golden solution StableOPD trains on with SFT). A
malformed JSONL line is an error that names the file and line: training on a silently shortened dataset
is worse than stopping. Hugging Face datasets need the optional `datasets` package and network (or a
local cache); offline the error says so.

    stableopd rollout --model tiny --data examples/prompts.jsonl -s data.limit=8
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stableopd.errors import UserError
from stableopd.files import MIB, check_input, iter_lines, read_text


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    answer: str | None = None
    solution: str | None = None


@dataclass(frozen=True)
class Fields:
    id: str = "id"
    prompt: str = "prompt"
    answer: str = "answer"
    solution: str = "solution"


def _json(text: str, where: str, *, with_line: bool = False, advice: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f" at line {exc.lineno}" if with_line else ""
        raise UserError(f"{where}: not valid JSON ({exc.msg}{at}){advice}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def read_jsonl(path: Path, *, max_file_mb: int = 4096, max_line_mb: int = 64, what: str = "data file"
               ) -> list[dict[str, Any]]:
    """Every object of a JSONL file, read whole: held to `max_file_mb` and `max_line_mb` (data.*)."""
    rows = []
    for lineno, line, _ in iter_lines(path, max_line_bytes=max_line_mb * MIB, key="data.max_line_mb", what=what,
                                      max_bytes=max_file_mb * MIB, size_key="data.max_file_mb"):
        if not line.strip():
            continue
        row = _json(line, f"{path}:{lineno}", advice="; fix or remove that line")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_rows(path: Path, *, max_file_mb: int, max_line_mb: int) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        check_input(path, "data file", max_bytes=max_file_mb * MIB, key="data.max_file_mb")
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading '{path}' needs pyarrow: pip install 'stableopd[parquet]'") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    if path.suffix == ".json":
        rows = _json(read_text(path, "data file", max_bytes=max_file_mb * MIB, key="data.max_file_mb"),
                     str(path), with_line=True)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: expected a JSON list of objects")
        return rows
    return read_jsonl(path, max_file_mb=max_file_mb, max_line_mb=max_line_mb)


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"'{name}' is neither a local file nor built-in; loading Hugging Face datasets "
                        "needs: pip install 'stableopd[datasets]'") from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # datasets raises many types for offline / unknown names
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load dataset '{name}' (split {split}): {msg}; "
                        "it needs network or a local copy (pass a .jsonl/.parquet path)") from None


def _to_example(row: dict[str, Any], idx: int, fields: Fields, where: str) -> Example:
    if fields.prompt not in row:
        raise UserError(f"{where}: row {idx} has no '{fields.prompt}' field (fields: {', '.join(row)}); "
                        f"set data.prompt_field")

    def opt(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or v == "" else str(v)

    return Example(id=str(row.get(fields.id, idx)), prompt=str(row[fields.prompt]),
                   answer=opt(fields.answer), solution=opt(fields.solution))


def load_examples(source: str, *, split: str = "train", fields: Fields | None = None, limit: int | None = None,
                  shuffle: bool = False, seed: int = 0, max_file_mb: int = 4096, max_line_mb: int = 64
                  ) -> list[Example]:
    """Read a source into Examples; `shuffle` (by `seed`) happens before `limit`. A local file over
    `max_file_mb`, or with a line over `max_line_mb`, is refused before it fills memory."""
    fields = fields or Fields()
    if source.startswith("builtin:"):
        from stableopd.arith import builtin_examples

        examples = builtin_examples(source, split=split, limit=limit, seed=seed)
    else:
        path = Path(source).expanduser()
        if path.exists() or path.is_symlink():
            rows = _read_rows(path, max_file_mb=max_file_mb, max_line_mb=max_line_mb)
        elif path.suffix in (".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~")):
            raise UserError(f"data file '{source}' does not exist")
        else:
            rows = _read_hub(source, split)
        examples = [_to_example(r, i, fields, source) for i, r in enumerate(rows)]
    if not examples:
        raise UserError(f"data source '{source}' holds no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"data source '{source}' has duplicate id '{dup}'; ids must be unique")
    if shuffle:
        random.Random(seed).shuffle(examples)
    return examples[:limit] if limit else examples


def examples_for(d, *, source: str | None = None, split: str | None = None, limit: int | None = None,
                 shuffle: bool | None = None) -> list[Example]:
    """`load_examples` with the field names, order and file limits of a `DataConfig` `d`."""
    fields = Fields(id=d.id_field, prompt=d.prompt_field, answer=d.answer_field, solution=d.solution_field)
    return load_examples(source or d.source, split=split or d.split, fields=fields, limit=limit,
                         shuffle=d.shuffle if shuffle is None else shuffle, seed=d.seed,
                         max_file_mb=d.max_file_mb, max_line_mb=d.max_line_mb)


def encode_prompt(tokenizer, text: str, *, chat_template: bool = True, system_prompt: str | None = None) -> list[int]:
    """Token ids of one prompt, through the chat template (with the generation prompt) unless turned off."""
    if not chat_template:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def encode_prompts(tokenizer, examples: list[Example], *, chat_template: bool = True,
                   system_prompt: str | None = None, max_tokens: int | None = None) -> list[list[int]]:
    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt)
        if max_tokens is not None and len(ids) > max_tokens:
            raise UserError(f"prompt '{ex.id}' is {len(ids)} tokens, over data.max_prompt_tokens={max_tokens}; "
                            "raise the limit or drop the prompt")
        out.append(ids)
    return out
