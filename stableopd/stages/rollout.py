"""Sampling rollouts into records (`types.Rollout`), their summary, and the `stableopd rollout` stage.

stableopd rollout --model tiny --data builtin:arith -s sampling.n=2 -s sampling.max_new_tokens=16 --out x.jsonl
"""

from __future__ import annotations

import statistics
from pathlib import Path

from stableopd.backends.base import Backend, split_stop
from stableopd.core.repetition import is_repetitive
from stableopd.errors import UserError
from stableopd.files import write_jsonl_atomic
from stableopd.progress import progress_bar
from stableopd.types import Example, Rollout, Sample, SamplingParams


def make_record(
    ex: Example,
    prompt_ids: list[int],
    idx: int,
    sample: Sample,
    tokenizer,
    stop_ids: list[int],
    *,
    rep_tail_chars: int,
    rep_ratio: float,
) -> Rollout:
    ids, lps, truncated = split_stop(sample, stop_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    repetitive, ratio = is_repetitive(text, rep_tail_chars, rep_ratio)
    return Rollout(
        prompt_id=ex.id,
        sample_idx=idx,
        prompt=ex.prompt,
        prompt_token_ids=list(prompt_ids),
        response=text,
        response_token_ids=ids,
        sampler_logprobs=lps,
        n_tokens=len(ids),
        finish_reason="length" if truncated else "stop",
        truncated=truncated,
        repetitive=repetitive,
        compression_ratio=round(ratio, 4),
        stop_token_id=None if truncated else sample.token_ids[-1],
        stop_logprob=None if truncated else sample.logprobs[-1],
        answer=ex.answer,
    )


def sample_records(
    backend: Backend,
    tokenizer,
    examples: list[Example],
    prompt_ids: list[list[int]],
    params: SamplingParams,
    stop_ids: list[int],
    *,
    rep_tail_chars: int,
    rep_ratio: float,
    chunk: int | None = None,
    progress: bool = True,
    label: str = "sampling",
) -> list[Rollout]:
    """Sample params.n responses for every prompt; records come back in (prompt, sample) order.

    Without a progress bar every prompt goes to the backend in one call, which batches them as its options
    say (the hf backend's `batch_size`); with one, `chunk` prompts per call (default: the backend's
    `prompts_per_call`, else 8) so the bar moves."""
    if chunk is None:
        chunk = (getattr(backend, "prompts_per_call", None) or 8) if progress else max(1, len(examples))
    records: list[Rollout] = []
    with progress_bar(label, total=len(examples), enabled=progress) as advance:
        for start in range(0, len(examples), chunk):
            exs, pids = examples[start : start + chunk], prompt_ids[start : start + chunk]
            sub = SamplingParams(**{**params.__dict__, "seed": params.seed * 7919 + start})
            batch = backend.generate(pids, sub)
            check_banned(backend, batch, params.banned_token_ids)
            for ex, pid, samples in zip(exs, pids, batch):
                records.extend(
                    make_record(
                        ex, pid, i, s, tokenizer, stop_ids, rep_tail_chars=rep_tail_chars, rep_ratio=rep_ratio
                    )
                    for i, s in enumerate(samples)
                )
            advance(len(exs))
    return records


def check_banned(backend: Backend, batch: list[list[Sample]], banned: tuple[int, ...]) -> None:
    """A backend that ignores SamplingParams.banned_token_ids would hand the teacher tokens it reads differently."""
    if not banned:
        return
    bad = set(banned)
    for samples in batch:
        for s in samples:
            hit = next((t for t in s.token_ids if t in bad), None)
            if hit is not None:
                raise UserError(
                    f"sampling backend '{getattr(backend, 'name', type(backend).__name__)}' produced "
                    f"token id {hit}, which SamplingParams.banned_token_ids forbids (the teacher reads "
                    "it as another token); the backend must honour banned_token_ids"
                )


def summarize(records: list[Rollout]) -> dict[str, float]:
    """Count, length mean/p50/p90/max (tokens), truncation and repetition rates."""
    if not records:
        return {"count": 0}
    lengths = sorted(r.n_tokens for r in records)

    def pct(q: float) -> float:
        return float(lengths[min(len(lengths) - 1, int(q * len(lengths)))])

    return {
        "count": len(records),
        "length_mean": statistics.fmean(lengths),
        "length_p50": pct(0.5),
        "length_p90": pct(0.9),
        "length_max": float(lengths[-1]),
        "trunc_rate": sum(r.truncated for r in records) / len(records),
        "rep_rate": sum(r.repetitive for r in records) / len(records),
    }


def sample_model(
    cfg,
    model: str,
    examples: list[Example],
    params: SamplingParams,
    *,
    progress: bool,
    label: str = "sampling",
) -> list[Rollout]:
    """Load `model` with the student section's settings, then sample `params.n` responses per example with the
    configured sampler; the model is freed when this returns."""
    from stableopd.models.loading import stop_token_ids
    from stableopd.stages.build import encode, load_spec, sampler

    loaded = load_spec(cfg.student, name=model)
    stop_ids = stop_token_ids(loaded.tokenizer, loaded.model)
    return sample_records(
        sampler(cfg, loaded, stop_ids),
        loaded.tokenizer,
        examples,
        encode(cfg, loaded.tokenizer, examples),
        params,
        stop_ids,
        rep_tail_chars=cfg.diagnose.rep_tail_chars,
        rep_ratio=cfg.diagnose.rep_ratio,
        progress=progress,
        label=label,
    )


def run_rollout(cfg, *, out: Path) -> dict[str, float]:
    """The `rollout` stage: load the model and prompts, sample, write records, return the summary."""
    from stableopd.data.sources import examples_for
    from stableopd.files import check_output_file
    from stableopd.stages.build import train_sampling

    check_output_file(out, "rollout output")
    d = cfg.data
    examples = examples_for(d, limit=d.limit)
    records = sample_model(
        cfg, cfg.student.name, examples, train_sampling(cfg), progress=cfg.logging.progress
    )
    write_jsonl_atomic(out, (r.to_json() for r in records))
    return summarize(records)


def print_rollout_summary(summary: dict[str, float], out: Path) -> None:
    from rich.table import Table

    from stableopd.progress import console

    table = Table(title=f"rollouts -> {out}", show_header=True)
    for key in ("count", "length_mean", "length_p50", "length_p90", "length_max", "trunc_rate", "rep_rate"):
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(
        *(
            f"{summary.get(k, 0):.3g}" if isinstance(summary.get(k), float) else str(summary.get(k, 0))
            for k in (
                "count",
                "length_mean",
                "length_p50",
                "length_p90",
                "length_max",
                "trunc_rate",
                "rep_rate",
            )
        )
    )
    console.print(table)
