"""How a teacher reads what the student samples: its own prompt, the shared response ids, its own end token.

The student samples token ids; the teacher (and the reference, which is the student's own initial weights)
score those same ids. Two models of one family can still differ where it matters:
- the chat template. Each model formats the prompt with its own template (DeepSeek-R1-Distill-Qwen writes
  `<｜begin▁of▁sentence｜>...<｜User｜>...<｜Assistant｜>`, Qwen2.5 writes `<|im_start|>user ... <|im_end|>`), so
  the prompt ids differ per model and only the response ids are shared;
- the end token. Qwen2.5-Math ends with `<|endoftext|>`, an Instruct-derived teacher ends its turn with
  `<|im_end|>`. When the student stops, the teacher is scored on its own end-of-turn token at that
  position (`TokenPair.stop_map`), and a full-vocabulary divergence exchanges the two columns of the
  teacher's distribution (`TokenPair.swaps`), so "stop here" means the same on both sides;
- added tokens. Ids past the shared base vocabulary can name different tokens (151644 is `<|im_start|>` in
  Qwen2.5 and `<｜User｜>` in R1-Distill). Every id a response can hold must mean the same to both: a pair
  that disagrees is refused, naming the first such id, unless `teacher.mismatched_tokens: suppress`,
  which keeps the student's sampler from ever producing those ids (`TokenPair.banned`). The trainer's
  student log-probs still spread over the full vocabulary, banned ids included; for a trained model their
  mass is far below the sampler-trainer sync tolerance (`sampling.max_sync_mismatch`).
Everything here reads tokenizers and generation configs only, so a bad pair fails before any weights load.

    stableopd distill -c examples/paper-qwen-math-1.5b.yaml --teacher r1-distill-7b -s teacher.mismatched_tokens=suppress
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stableopd.errors import UserError


@dataclass(frozen=True)
class TokenPair:
    vocab_size: int  # ids both tokenizers define; the kernels' softmax runs over these
    student_stops: tuple[int, ...]  # ids that end a student response
    teacher_end: int  # the teacher's own end-of-turn id
    stop_map: dict[int, int]  # student stop id -> the id the teacher is scored on at that position
    swaps: tuple[
        tuple[int, int], ...
    ]  # (student id, teacher id) columns exchanged in the teacher's distribution
    banned: tuple[int, ...]  # ids the student's sampler must never produce (they mean different things)

    @property
    def identity(self) -> bool:
        return all(s == t for s, t in self.stop_map.items()) and not self.swaps

    def teacher_target(self, target: list[int], stopped: bool) -> list[int]:
        """The response ids as the teacher scores them: the stop token (last, when it stopped) mapped."""
        if not stopped or not target:
            return list(target)
        return [*target[:-1], self.stop_map.get(target[-1], target[-1])]


def stop_ids(tokenizer, generation_config: Any = None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the generation config's eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(ids)


def end_of_turn_id(tokenizer, *, chat_template: bool) -> int | None:
    """The id a model writes after its own assistant turn: read off its chat template (the first special or
    added token after the assistant's text), else its EOS."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        marker = "Zq7mark"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
            )
        except Exception:  # a template that cannot render a closed assistant turn: fall back to EOS
            text = ""
        if isinstance(text, str) and marker in text:
            tail = text[text.rindex(marker) + len(marker) :]
            added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
            for i in tokenizer(tail, add_special_tokens=False)["input_ids"]:
                if i in added:
                    return i
    return tokenizer.eos_token_id


def check_base_vocab(ta, tb, who_a: str, who_b: str) -> int:
    """The base (non-added) vocabularies must be identical; return their size."""
    base = min(ta.vocab_size, tb.vocab_size)
    va = {t: i for t, i in ta.get_vocab().items() if i < base}
    vb = {t: i for t, i in tb.get_vocab().items() if i < base}
    if ta.vocab_size != tb.vocab_size or va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise UserError(
            f"{who_a} and {who_b} have different tokenizer vocabularies ({ta.vocab_size} vs "
            f"{tb.vocab_size} base tokens, {diff} entries differ); pick models of the same family"
        )
    return base


def token_name(tokenizer, i: int) -> str | None:
    return tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None


def pair_tokens(
    student,
    teacher,
    *,
    student_stops: list[int],
    chat_template: bool,
    teacher_end: str | None = None,
    mismatched: str = "error",
    names: tuple[str, str] = ("student", "teacher"),
) -> TokenPair:
    """Check that `teacher` can score what `student` samples, token by token; say how (TokenPair)."""
    a, b = names
    base = check_base_vocab(student, teacher, f"student '{a}'", f"teacher '{b}'")
    if not student_stops:
        raise UserError(f"student '{a}' has no end-of-sequence token: its responses could never stop")
    if teacher_end is not None:
        end = teacher.convert_tokens_to_ids(teacher_end)
        if end is None or end == teacher.unk_token_id or token_name(teacher, end) != teacher_end:
            raise UserError(f"teacher.end_token={teacher_end!r} is not a token of teacher '{b}'")
    else:
        end = end_of_turn_id(teacher, chat_template=chat_template)
        if end is None:
            raise UserError(f"teacher '{b}' has no end-of-sequence token; name one with teacher.end_token")
    stop_map = {s: end for s in student_stops}
    differing = [
        i
        for i in range(base, len(student))
        if i not in stop_map and token_name(student, i) != token_name(teacher, i)
    ]
    banned: tuple[int, ...] = ()
    if differing:
        i = differing[0]
        if mismatched != "suppress":
            raise UserError(
                f"student '{a}' and teacher '{b}' disagree on {len(differing)} token id(s) a response can hold: "
                f"id {i} is {token_name(student, i)!r} for the student and {token_name(teacher, i)!r} for the "
                "teacher; set teacher.mismatched_tokens=suppress so the student never samples them, or pick "
                "a teacher with the student's tokens"
            )
        banned = tuple(differing)
    primary = student.eos_token_id if student.eos_token_id in student_stops else student_stops[0]
    swaps = ((primary, end),) if end not in student_stops else ()
    return TokenPair(
        vocab_size=min(len(student), len(teacher)),
        student_stops=tuple(student_stops),
        teacher_end=end,
        stop_map=stop_map,
        swaps=swaps,
        banned=banned,
    )
