"""Presets for the paper's six evaluation benchmarks (the paper's section 6).

`-s eval.preset=NAME` fills in, for the named benchmark, the Hugging Face dataset, its split and field
names, the samples per problem that its metric needs (avg@32 for AIME24, AIME25 and AMC; pass@1 for
MATH-500, Minerva and OlympiadBench), the answer checker, and the usual instruction to box the answer
(as the system prompt). Anything the user set explicitly wins: `-s eval.n=4` makes an AIME run avg@4,
`--data aime24.jsonl` reads a local copy (it must use the preset's field names unless those are renamed
too). Temperature 0.6 is the eval default already; over a run directory's own config (`stableopd eval
RUN_DIR`) the preset sets it too, and the budget stays the run's.

Presets name hub datasets, so they need network (and `pip install 'stableopd[datasets]'`) or a local copy;
offline, `load_preset_examples` says so in one line and names the file to pass instead.

Deviations: the paper does not name its copies of the benchmarks. These are widely used mirrors;
HuggingFaceH4/MATH-500 and HuggingFaceH4/aime_2024 field names are from their dataset cards, the others
(math-ai/aime25, AI-MO/aimo-validation-amc, math-ai/minervamath, math-ai/olympiadbench) are
unverified here (no network when written) and may need `-s data.prompt_field=...`. The paper's AMC may be
AMC23 (40 problems) rather than the 83-problem AMC 2022-23 set used here.

    stableopd eval --model qwen-math-1.5b -s eval.preset=aime24
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stableopd.data.sources import examples_for
from stableopd.errors import UserError
from stableopd.types import Example

if TYPE_CHECKING:  # the config is the stages' own: a preset updates the one it is handed
    from stableopd.config import Config

PAPER_TEMPERATURE = 0.6  # the paper's section 6
BOX_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # Hugging Face dataset id
    split: str
    prompt_field: str
    answer_field: str
    id_field: str
    n: int  # samples per problem the paper's metric uses
    metric: str  # "avg@32" | "pass@1"
    checker: str = "math"
    solution_field: str = "solution"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id", 1, "pass@1"),
        Preset("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "id", 32, "avg@32"),
        Preset("aime25", "math-ai/aime25", "test", "problem", "answer", "id", 32, "avg@32"),
        Preset("amc", "AI-MO/aimo-validation-amc", "train", "problem", "answer", "id", 32, "avg@32"),
        Preset("minerva", "math-ai/minervamath", "test", "question", "answer", "id", 1, "pass@1"),
        Preset(
            "olympiadbench", "math-ai/olympiadbench", "test", "question", "final_answer", "id", 1, "pass@1"
        ),
    )
}
ALIASES = {
    "math-500": "math500",
    "aime2024": "aime24",
    "aime2025": "aime25",
    "amc23": "amc",
    "minerva-math": "minerva",
    "olympiad": "olympiadbench",
    "olympiad_bench": "olympiadbench",
}


def get_preset(name: str) -> Preset:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise UserError(f"unknown eval preset '{name}'; available: {', '.join(PRESETS)}")
    return PRESETS[key]


def preset_updates(p: Preset) -> dict[str, dict[str, object]]:
    """What a preset sets, as config sections."""
    data = {
        "source": p.source,
        "split": p.split,
        "prompt_field": p.prompt_field,
        "answer_field": p.answer_field,
        "id_field": p.id_field,
        "solution_field": p.solution_field,
        "system_prompt": BOX_INSTRUCTION,
    }
    return {"data": data, "eval": {"n": p.n, "checker": p.checker, "temperature": PAPER_TEMPERATURE}}


def apply_preset(cfg: Config) -> tuple[Config, Preset | None]:
    """A copy of `cfg` with the preset's settings wherever the user did not set the key explicitly."""
    if not cfg.eval.preset:
        return cfg, None
    p = get_preset(cfg.eval.preset)
    data, ev = cfg.data, cfg.eval
    updates = preset_updates(p)
    data_updates, eval_updates = updates["data"], updates["eval"]
    data = data.model_copy(update={k: v for k, v in data_updates.items() if k not in data.model_fields_set})
    ev = ev.model_copy(update={k: v for k, v in eval_updates.items() if k not in ev.model_fields_set})
    return cfg.model_copy(update={"data": data, "eval": ev}), p


def load_preset_examples(cfg: Config, preset: Preset, *, limit: int | None) -> list[Example]:
    """Load the preset's problems; offline or without `datasets`, one line that says what to do."""
    try:
        return examples_for(cfg.data, limit=limit, shuffle=False)
    except UserError as exc:
        if cfg.data.source != preset.source:  # the user's own local copy: its own error is the right one
            raise
        raise UserError(
            f"eval preset '{preset.name}' reads the Hugging Face dataset '{preset.source}' "
            f"(split {preset.split}), which needs network or a local copy: pass --data FILE.jsonl "
            f"with fields '{preset.prompt_field}' and '{preset.answer_field}' ({exc})"
        ) from None
