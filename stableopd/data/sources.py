"""Prompts: local JSONL/JSON/Parquet files, the built-in `builtin:arith` world, or Hugging Face datasets.

Every source yields `Example(id, prompt, answer, solution)`; field names are renameable (defaults `id`,
`prompt`, `answer`, `solution`, the last being the golden solution StableOPD trains on with SFT). A
malformed JSONL line is an error that names the file and line: training on a silently shortened dataset
is worse than stopping. Hugging Face datasets need the optional `datasets` package and network (or a
local cache); offline the error says so.

Golden solutions may come from a list field, as in OpenR1-Math-220k (`generations`, 2-4 R1 traces, with
`correctness_math_verify` parallel to it): with `data.solution_correct_field` the solution is the first
trace flagged true (a null flag, or a text solution, counts as unverified), without it the first non-empty
string. A list in the id or prompt field, or an object in any, is an error, never its Python repr (a list
answer keeps the repr `answers.normalize_gold` reads). `keep_for_training` then drops the training
examples without a verified solution or over `data.max_solution_tokens`.

    stableopd rollout --model tiny --data examples/prompts.jsonl -s data.limit=8
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stableopd.errors import UserError
from stableopd.files import MIB, check_input, iter_lines, read_text
from stableopd.types import Example


@dataclass(frozen=True)
class Fields:
    id: str = "id"
    prompt: str = "prompt"
    answer: str = "answer"
    solution: str = "solution"
    solution_correct: str | None = None  # the list of booleans parallel to a list `solution`


def _json(text: str, where: str, *, with_line: bool = False, advice: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f" at line {exc.lineno}" if with_line else ""
        raise UserError(f"{where}: not valid JSON ({exc.msg}{at}){advice}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None


def read_jsonl(
    path: Path, *, max_file_mb: int = 4096, max_line_mb: int = 64, what: str = "data file"
) -> list[dict[str, Any]]:
    """Every object of a JSONL file, read whole: held to `max_file_mb` and `max_line_mb` (data.*)."""
    rows = []
    for lineno, line, _ in iter_lines(
        path,
        max_line_bytes=max_line_mb * MIB,
        key="data.max_line_mb",
        what=what,
        max_bytes=max_file_mb * MIB,
        size_key="data.max_file_mb",
    ):
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
            raise UserError(
                f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})"
            ) from None
    if path.suffix == ".json":
        rows = _json(
            read_text(path, "data file", max_bytes=max_file_mb * MIB, key="data.max_file_mb"),
            str(path),
            with_line=True,
        )
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: expected a JSON list of objects")
        return rows
    return read_jsonl(path, max_file_mb=max_file_mb, max_line_mb=max_line_mb)


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"'{name}' is neither a local file nor built-in; loading Hugging Face datasets "
            "needs: pip install 'stableopd[datasets]'"
        ) from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # datasets raises many types for offline / unknown names
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot load dataset '{name}' (split {split}): {msg}; "
            "it needs network or a local copy (pass a .jsonl/.parquet path)"
        ) from None


def _to_example(row: dict[str, Any], idx: int, fields: Fields, where: str) -> Example:
    if fields.prompt not in row:
        raise UserError(
            f"{where}: row {idx} has no '{fields.prompt}' field (fields: {', '.join(row)}); "
            f"set data.prompt_field"
        )

    def plain(field: str, key: str, default: Any = None, *, lists: bool = False) -> Any:
        v = row.get(field, default)
        if isinstance(v, dict) or (isinstance(v, list) and not lists):  # never its Python repr
            raise UserError(
                f"{where}: row {idx}: field '{field}' is a {type(v).__name__}, not text; "
                f"set {key} to a text field"
            )
        return v

    prompt = plain(fields.prompt, "data.prompt_field")
    # a list answer (OlympiadBench's final_answer) stays its repr, which answers.normalize_gold reads
    answer = plain(fields.answer, "data.answer_field", lists=True)
    return Example(
        id=str(plain(fields.id, "data.id_field", idx)),
        prompt=str(prompt),
        answer=None if answer is None or answer == "" else str(answer),
        solution=_solution(row, idx, fields, where),
    )


def _solution(row: dict[str, Any], idx: int, fields: Fields, where: str) -> str | None:
    """The golden solution of one row: from a list, the first item flagged true in `fields.solution_correct`
    or, without that field, the first non-empty string; text as is, or None with that field."""
    field, flags_field = fields.solution, fields.solution_correct
    v = row.get(field)
    if v is None:  # no solution in this row (e.g. a validation set without the field)
        return None
    at = f"{where}: row {idx}"
    if isinstance(v, dict):
        raise UserError(
            f"{at}: field '{field}' is a dict, not text or a list of text; check data.solution_field"
        )
    if not isinstance(v, list):
        # with flags, text is unverified: an eval preset's benchmark read with a run's data keys has no traces
        return None if v == "" or flags_field is not None else str(v)
    bad = next((i for i, s in enumerate(v) if not isinstance(s, str | None)), None)
    if bad is not None:
        raise UserError(
            f"{at}: item {bad} of field '{field}' is a {type(v[bad]).__name__}, not text; "
            "set data.solution_field to a list of strings"
        )
    if flags_field is None:
        return next((s for s in v if s), None)
    if flags_field not in row:
        raise UserError(
            f"{at} has no '{flags_field}' field (fields: {', '.join(row)}); set data.solution_correct_field"
        )
    flags = row[flags_field]
    if flags is None:  # no verdict at all: nothing verified
        return None
    if not isinstance(flags, list):
        raise UserError(
            f"{at}: field '{flags_field}' is a {type(flags).__name__}, not a list of booleans; "
            "check data.solution_correct_field"
        )
    if len(flags) != len(v):
        raise UserError(
            f"{at}: '{flags_field}' has {len(flags)} flags for {len(v)} items of '{field}'; "
            "data.solution_correct_field must name the list parallel to data.solution_field"
        )
    bad = next((i for i, f in enumerate(flags) if not isinstance(f, bool | None)), None)
    if bad is not None:
        raise UserError(
            f"{at}: flag {bad} of '{flags_field}' is a {type(flags[bad]).__name__}, "
            "not a boolean; check data.solution_correct_field"
        )
    return next((s for s, ok in zip(v, flags) if ok and s), None)


def load_examples(
    source: str,
    *,
    split: str = "train",
    fields: Fields | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    max_file_mb: int = 4096,
    max_line_mb: int = 64,
) -> list[Example]:
    """Read a source into Examples; `shuffle` (by `seed`) happens before `limit`. A local file over
    `max_file_mb`, or with a line over `max_line_mb`, is refused before it fills memory."""
    fields = fields or Fields()
    if source.startswith("builtin:"):
        from stableopd.data.arith import builtin_examples

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


def examples_for(
    d,
    *,
    source: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    shuffle: bool | None = None,
) -> list[Example]:
    """`load_examples` with the field names, order and file limits of a `DataConfig` `d`."""
    fields = Fields(
        id=d.id_field,
        prompt=d.prompt_field,
        answer=d.answer_field,
        solution=d.solution_field,
        solution_correct=d.solution_correct_field,
    )
    return load_examples(
        source or d.source,
        split=split or d.split,
        fields=fields,
        limit=limit,
        shuffle=d.shuffle if shuffle is None else shuffle,
        seed=d.seed,
        max_file_mb=d.max_file_mb,
        max_line_mb=d.max_line_mb,
    )


@dataclass(frozen=True)
class Kept:
    """The training examples `keep_for_training` kept, in order, and how many each rule dropped."""

    examples: list[Example]
    total: int
    unverified: int = 0  # no golden solution, with verified_only
    too_long: int = 0  # a golden solution over max_tokens


def keep_for_training(
    examples: list[Example], n_tokens: list[int | None] | None, *, verified_only: bool, max_tokens: int | None
) -> Kept:
    """Drop the examples with no golden solution when `verified_only` (data.solution_correct_field is set),
    then those whose solution is over `max_tokens` tokens (data.max_solution_tokens); `n_tokens[i]` is the
    token count of example i's solution (None without one), read only with `max_tokens`."""
    kept, unverified, too_long = [], 0, 0
    for i, ex in enumerate(examples):
        if ex.solution is None and verified_only:
            unverified += 1
        elif max_tokens is not None and ex.solution is not None and n_tokens[i] > max_tokens:
            too_long += 1
        else:
            kept.append(ex)
    if not kept:
        raise UserError(
            f"data: no training example kept of {len(examples):,} ({unverified:,} with no "
            f"verified solution, {too_long:,} with a solution over {max_tokens} tokens); check "
            "data.solution_correct_field or raise data.max_solution_tokens"
        )
    return Kept(kept, len(examples), unverified, too_long)


def kept_note(kept: Kept, *, verified_only: bool, max_tokens: int | None) -> str:
    """'data: kept 46,012 of 93,733 training examples (dropped 30,100 with no verified solution, 17,621 with
    a solution over 8192 tokens)', naming only the rules that are on."""
    why = ([f"{kept.unverified:,} with no verified solution"] if verified_only else []) + (
        [f"{kept.too_long:,} with a solution over {max_tokens} tokens"] if max_tokens is not None else []
    )
    return f"data: kept {len(kept.examples):,} of {kept.total:,} training examples (dropped {', '.join(why)})"


def encode_prompt(
    tokenizer, text: str, *, chat_template: bool = True, system_prompt: str | None = None
) -> list[int]:
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


def encode_prompts(
    tokenizer,
    examples: list[Example],
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt)
        if max_tokens is not None and len(ids) > max_tokens:
            raise UserError(
                f"prompt '{ex.id}' is {len(ids)} tokens, over data.max_prompt_tokens={max_tokens}; "
                "raise the limit or drop the prompt"
            )
        out.append(ids)
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    perm = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


def step_indices(n_examples: int, step: int, per_step: int, seed: int) -> list[int]:
    """Example indices of `step` (1-based): consecutive slices of a fresh permutation per data epoch."""
    out = []
    for j in range(per_step):
        epoch, offset = divmod((step - 1) * per_step + j, n_examples)
        out.append(_epoch_order(n_examples, seed, epoch)[offset])
    return out


def solution_ids(tokenizer, examples: list[Example], chunk: int = 1024) -> list[list[int] | None]:
    """Each golden solution's token ids (the gold target without its stop token), None where there is none;
    tokenised in batches, which a fast tokenizer spreads over threads."""
    texts = [ex.solution for ex in examples if ex.solution is not None]
    ids = [
        row
        for i in range(0, len(texts), chunk)
        for row in tokenizer(texts[i : i + chunk], add_special_tokens=False)["input_ids"]
    ]
    rows = iter(ids)
    return [None if ex.solution is None else list(next(rows)) for ex in examples]


def gold_targets(tokenizer, examples: list[Example], eos: int) -> list[list[int] | None]:
    return [None if ids is None else ids + [eos] for ids in solution_ids(tokenizer, examples)]
