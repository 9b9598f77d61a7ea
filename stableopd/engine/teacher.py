"""Scoring sampled tokens with a frozen model (the teacher, or the student before its update).

For each sequence, the log-prob of every target token under the model at `temperature` (the teacher
reads its own prompt and end token: stableopd/models/pairing.py), computed in
micro-batches under `no_grad` through the chunked kernel, so scoring a 7B teacher over 8k-token
responses never materialises the (tokens x vocabulary) logits. Only the shared vocabulary counts
(`vocab_size`): embedding rows past it are padding.

    stableopd distill --student tiny --teacher tiny-teacher -s train.steps=2
"""

from __future__ import annotations

import torch

from stableopd.core.batch import output_weight, pack, target_hidden
from stableopd.core.kernels import linear_kl, linear_logprobs


@torch.no_grad()
def score_targets(
    model,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    pad_id: int,
    micro_batch: int,
    chunk_size: int,
    vocab_size: int,
    temperature: float = 1.0,
) -> list[list[float]]:
    """Per-sequence lists of log p(target_t | prefix) under `model`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for start in range(0, len(prompts), micro_batch):
        packed = pack(
            prompts[start : start + micro_batch], targets[start : start + micro_batch], pad_id, device
        )
        hidden = target_hidden(model, packed)  # (N, d)
        lp, _ = linear_logprobs(
            hidden,
            output_weight(model),
            packed.targets,
            chunk_size=chunk_size,
            temperature=temperature,
            vocab_size=vocab_size,
        )  # (N,)
        flat = lp.float().cpu().tolist()
        pos = 0
        for n in packed.lengths:
            out.append(flat[pos : pos + n])
            pos += n
    if was_training:
        model.train()
    return out


@torch.no_grad()
def reverse_kl_sums(
    student,
    teacher,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    pad_id: int,
    micro_batch: int,
    chunk_size: int,
    vocab_size: int,
    n_batches: int | None = None,
    teacher_prompts: list[list[int]] | None = None,
    swaps: tuple[tuple[int, int], ...] = (),
) -> tuple[float, int]:
    """(sum, count) over target tokens of KL(student || teacher). The teacher reads `teacher_prompts` (its
    own template; default `prompts`) before the same targets, and its distribution has the `swaps` columns
    exchanged (its end token where the student's is). With `n_batches`, exactly that many forwards run
    (a sharded model needs the same count on every rank): missing or empty micro-batches run on a one-token
    placeholder that is not counted."""
    device = next(student.parameters()).device
    total, count = 0.0, 0
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    t_prompts = prompts if teacher_prompts is None else teacher_prompts
    if len(t_prompts) != len(prompts):
        raise RuntimeError(f"{len(t_prompts)} teacher prompts for {len(prompts)} sequences")
    batches = -(-len(prompts) // micro_batch)
    for b in range(batches if n_batches is None else max(n_batches, batches)):
        rows = slice(b * micro_batch, (b + 1) * micro_batch)
        p, tp, t = prompts[rows], t_prompts[rows], targets[rows]
        real = sum(map(len, t)) > 0
        if not real and n_batches is None:
            continue
        if not real:
            p, tp, t = [[pad_id]], [[pad_id]], [[pad_id]]
        packed = pack(p, t, pad_id, device)
        t_packed = packed if tp == p else pack(tp, t, pad_id, device)
        kl = linear_kl(
            target_hidden(student, packed),
            output_weight(student),
            target_hidden(teacher, t_packed),
            output_weight(teacher),
            None,
            chunk_size=chunk_size,
            vocab_size=vocab_size,
            swap_other=swaps,
        )  # (N,)
        if real:
            total += float(kl.sum())
            count += kl.numel()
    student.train(modes[0])
    teacher.train(modes[1])
    return total, count
