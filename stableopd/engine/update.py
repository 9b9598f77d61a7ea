"""One optimisation pass of a distillation step: forward, losses and backward over micro-batches.

`accumulate` runs the student over the step's rollouts (and golden solutions) in micro-batches and
calls `backward` on each micro-batch's share of the loss. Every term is normalised by the counts of
the whole step (losses.token_weights), so the accumulated gradient does not depend on how the step is
split into micro-batches. `optimizer_step` wraps it into one optimizer pass: `zero_grad`, `accumulate`,
clipping, and `optimizer.step` unless the loss or the gradient norm is not finite. The terms that run and
their weights are the `Objective`'s (engine/objective.py).

Per rollout token t (the response's tokens, plus its stop token when it stopped):
    A_t   = shaped( log pi_T(y_t) - log pi_old(y_t) )                       detached
    L     = L_OPD(A) + gold_coef * L_SFT(golden) + ref_kl_coef * sum_t w_t KL_t(pi_theta || pi_ref)
Under the jsd objective (logged as loss/jsd) the OPD term is replaced by the full-vocabulary generalized JSD to the teacher
at the same prefixes (TRL's GKD family), which needs the teacher's hidden states in the training pass;
that forward is the step's only teacher forward, and it also fills the rollouts' teacher log-probs.
Truncated rollouts stay in the batch as they are, as in the paper: the point of StableOPD is to keep
them from taking over, not to hide them from the loss.

A token counts as repetitive (for `adv/repetitive_mean`, `rollout/rep_token_frac`) when
stableopd.core.repetition.repetitive_token_mask marks it: it lies inside a span that repeats earlier
token ids of the same response.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stableopd.core.batch import (
    Packed,
    from_lists,
    head_forward,
    output_weight,
    pack,
    row_mask,
    target_hidden,
    to_rows,
)
from stableopd.core.kernels import linear_jsd_sum, linear_kl_sum, linear_logprobs, linear_logprobs_sum
from stableopd.core.losses import (
    opd_loss,
    ref_kl_loss,
    reward_to_go,
    sft_loss,
    shape_advantage,
    token_weights,
)
from stableopd.engine.distributed import SINGLE, Dist
from stableopd.engine.objective import Objective
from stableopd.types import GoldSeq


@dataclass
class RolloutSeq:
    prompt: list[int]
    target: list[int]  # response ids, plus the stop token when the response stopped
    teacher_lp: list[float] | None  # (T,) log pi_T of each target token; None: the JSD update scores it
    sampler_lp: list[float]  # (T,) the sampler's log-probs of the same tokens
    repetitive: list[bool]  # (T,)
    old_lp: list[float] | None = None  # (T,) pi_old when several passes are made over one batch
    teacher_prompt: list[int] | None = None  # the prompt in the teacher's own template (None: `prompt`)
    teacher_target: list[int] | None = None  # `target` with the stop mapped to the teacher's (None: `target`)


@dataclass
class Sums:
    """Plain token sums for the step's diagnostic metrics (independent of the loss aggregation)."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor | float) -> None:
        self.values[key] = self.values.get(key, 0.0) + float(value)

    def ratio(self, num: str, den: str) -> float | None:
        d = self.values.get(den, 0.0)
        return self.values.get(num, 0.0) / d if d else None


def _counts(lengths: list[int]) -> tuple[int, int]:
    return sum(1 for n in lengths if n > 0), sum(lengths)


def _global_counts(dist: Dist, lengths: list[int]) -> tuple[int, int]:
    seqs, tokens = dist.all_sum(list(_counts(lengths)))
    return int(seqs), int(tokens)


def _rollout_chunk(
    student,
    ref,
    teacher,
    seqs: list[RolloutSeq],
    obj: Objective,
    totals: tuple[int, int],
    pad_id: int,
    sums: Sums,
) -> dict[str, torch.Tensor]:
    device = next(student.parameters()).device
    packed = pack([q.prompt for q in seqs], [q.target for q in seqs], pad_id, device)
    with (
        torch.no_grad()
    ):  # the frozen models' (hidden, output weight) the student's distribution is compared with
        t_side = None
        if obj.teacher_in_update:
            t0 = time.perf_counter()
            t_packed = _teacher_pack(seqs, packed, pad_id, device)
            t_side = (target_hidden(teacher, t_packed), output_weight(teacher))
            if seqs[0].teacher_lp is None:  # the step's only teacher forward: its log-probs come from it too
                _fill_teacher_lp(seqs, t_side, t_packed, obj)
            sums.add("teacher_s", time.perf_counter() - t0)
        r_side = (target_hidden(ref, packed), output_weight(ref)) if obj.uses_ref else None
    mask = row_mask(packed.lengths, device)  # (B, T)
    w = token_weights(mask, obj.aggregation, total_seqs=totals[0], total_tokens=totals[1])  # (B, T)
    w_flat = w[mask]  # (N,) in the order of packed.targets
    teacher_lp, _ = from_lists([q.teacher_lp for q in seqs], device)  # (B, T); under jsd, filled in above
    sampler_lp, _ = from_lists([q.sampler_lp for q in seqs], device)  # (B, T)
    # One pass on the sampler's own policy: pi_old is the sampler's log-probs, so the advantages, and with them
    # the OPD term's token weights, are known before the forward (forward-gradient kernel). Otherwise pi_old
    # is the trainer's (or a scoring pass's) and the clipped or re-weighted term needs the per-token kernel.
    fast_opd = obj.policy_term == "opd" and seqs[0].old_lp is None and obj.sampler_is_policy
    if fast_opd:
        adv = shape_advantage(
            teacher_lp, sampler_lp, obj.advantage, alpha=obj.power_alpha, bound=obj.adv_clip
        )  # (B, T)
        pg_adv = reward_to_go(adv, mask, gamma=obj.reward_to_go) if obj.reward_to_go > 0 else adv  # (B, T)
        opd_weights = -(w * pg_adv)[mask]  # (N,): d loss / d log pi(y_t), the policy gradient

    def head_terms(h, hw):  # every use of the student's head weight, in one forward (see batch.head_forward)
        # the JSD, KL and (on the sampler's policy) OPD token weights are known now, so their sums come with
        # their gradients from one sweep (kernels.*_sum: nothing recomputed in backward)
        if fast_opd:
            opd, lp, ent = linear_logprobs_sum(
                h, hw, packed.targets, opd_weights, chunk_size=obj.chunk_size, vocab_size=obj.vocab_size
            )  # (), (N,), (N,)
        else:
            opd = None
            lp, ent = linear_logprobs(
                h, hw, packed.targets, chunk_size=obj.chunk_size, vocab_size=obj.vocab_size
            )
        jsd = kl = (None, None)
        if t_side is not None:
            jsd = linear_jsd_sum(
                h,
                hw,
                *t_side,
                None,
                w_flat,
                beta=obj.jsd_beta,
                temperature=obj.teacher_temperature,
                chunk_size=obj.chunk_size,
                vocab_size=obj.vocab_size,
                swap_other=obj.teacher_swaps,
            )  # (), (N,)
        if r_side is not None:
            kl = linear_kl_sum(
                h, hw, *r_side, None, w_flat, chunk_size=obj.chunk_size, vocab_size=obj.vocab_size
            )  # (), (N,)
        return lp, ent, opd, *jsd, *kl

    new_flat, ent_flat, opd_sum, jsd_sum, _, kl_sum, kl_flat = head_forward(student, packed, head_terms)
    new = to_rows(new_flat, packed.lengths)[0]  # (B, T)
    rep, _ = from_lists([[float(r) for r in q.repetitive] for q in seqs], device)  # (B, T)
    if fast_opd:
        # the surrogate's value at rho = 1 (-sum w A, as opd_loss reports it) with the fused sum's gradient
        value, metrics = opd_loss(new.detach(), new.detach(), pg_adv, w, clip_eps=None)
        main = opd_sum - opd_sum.detach() + value
    else:
        old = from_lists([q.old_lp for q in seqs], device)[0] if seqs[0].old_lp is not None else new.detach()
        adv = shape_advantage(
            teacher_lp, old, obj.advantage, alpha=obj.power_alpha, bound=obj.adv_clip
        )  # (B, T)
        if obj.policy_term == "jsd":
            main = jsd_sum
            metrics = {"loss/jsd": main.detach()}
        else:
            pg_adv = (
                reward_to_go(adv, mask, gamma=obj.reward_to_go) if obj.reward_to_go > 0 else adv
            )  # (B, T)
            main, metrics = opd_loss(new, old, pg_adv, w, clip_eps=obj.clip_eps)
    total = main
    if obj.uses_ref:
        kl_loss, kl_metrics = ref_kl_loss(to_rows(kl_flat, packed.lengths)[0], w, total=kl_sum)
        metrics.update(kl_metrics)
        total = total + obj.ref_kl_coef * kl_loss
    total.backward()

    with torch.no_grad():
        m = mask.float()
        sums.add("tokens", m.sum())
        sums.add("student_lp", (new.detach() * m).sum())
        sums.add("teacher_lp", (teacher_lp * m).sum())
        sums.add("entropy", ent_flat.detach().sum())
        sums.add("adv", (adv * m).sum())
        sums.add("rep_tokens", (rep * m).sum())
        sums.add("adv_rep", (adv * rep * m).sum())
        sums.add("adv_reg", (adv * (1 - rep) * m).sum())
        sums.add("sample_minus_train", ((sampler_lp - new.detach()) * m).sum())
        sums.values["sample_train_absmax"] = max(
            sums.values.get("sample_train_absmax", 0.0), float(((sampler_lp - new.detach()).abs() * m).max())
        )
    return metrics


def _fill_teacher_lp(
    seqs: list[RolloutSeq], t_side: tuple[torch.Tensor, torch.Tensor], t_packed: Packed, obj: Objective
) -> None:
    """Each rollout's teacher log-probs from the hidden states the JSD term already has (what
    teacher.score_targets would compute from a forward of its own)."""
    lp, _ = linear_logprobs(
        *t_side,
        t_packed.targets,
        chunk_size=obj.chunk_size,
        temperature=obj.teacher_temperature,
        vocab_size=obj.vocab_size,
    )  # (N,)
    flat, pos = lp.float().cpu().tolist(), 0
    for q, n in zip(seqs, t_packed.lengths):
        q.teacher_lp = flat[pos : pos + n]
        pos += n


def _teacher_pack(seqs: list[RolloutSeq], packed: Packed, pad_id: int, device) -> Packed:
    """The teacher's view of the micro-batch: its own prompts before the same response ids."""
    if all(q.teacher_prompt is None and q.teacher_target is None for q in seqs):
        return packed
    return pack(
        [q.prompt if q.teacher_prompt is None else q.teacher_prompt for q in seqs],
        [q.target if q.teacher_target is None else q.teacher_target for q in seqs],
        pad_id,
        device,
    )


def _gold_chunk(
    student,
    seqs: list[GoldSeq],
    obj: Objective,
    totals: tuple[int, int],
    pad_id: int,
    sums: Sums,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    device = next(student.parameters()).device
    packed = pack([q.prompt for q in seqs], [q.target for q in seqs], pad_id, device)
    mask = row_mask(packed.lengths, device)  # (B, T)
    w = token_weights(mask, "seq_mean", total_seqs=totals[0], total_tokens=totals[1]) * scale  # (B, T)
    neg_w = -w[mask]  # (N,): the fused sum is the loss itself
    total, lp, _ = head_forward(
        student,
        packed,
        lambda h, hw: linear_logprobs_sum(
            h, hw, packed.targets, neg_w, chunk_size=obj.chunk_size, vocab_size=obj.vocab_size
        ),
    )  # (), (N,), (N,)
    loss, metrics = sft_loss(to_rows(lp, packed.lengths)[0], w, total=total)
    (obj.gold_coef * loss).backward()
    sums.add("gold_tokens", mask.sum() * scale)
    return metrics


def accumulate(
    student,
    ref,
    teacher,
    rollouts: list[RolloutSeq],
    golds: list[GoldSeq],
    obj: Objective,
    *,
    pad_id: int,
    micro_batch: int,
    dist: Dist = SINGLE,
) -> dict[str, float]:
    """Backward the whole step's loss into `student`'s .grad, micro-batch by micro-batch; return metrics.

    With K processes (`dist`), rollouts/golds are this rank's shard: counts are summed over ranks, every
    rank runs the same number of micro-batches, and the returned metrics are those of the global batch."""
    sums, acc = Sums(), {}
    totals = _global_counts(dist, [len(q.target) for q in rollouts])
    for start in range(0, len(rollouts), micro_batch):
        for k, v in _rollout_chunk(
            student, ref, teacher, rollouts[start : start + micro_batch], obj, totals, pad_id, sums
        ).items():
            acc[k] = acc.get(k, 0.0) + float(v)
    if obj.uses_gold:
        gold_totals = _global_counts(dist, [len(q.target) for q in golds])
        n_chunks = int(dist.all_max([-(-len(golds) // micro_batch)])[0])
        dummy = [GoldSeq(prompt=[pad_id], target=[pad_id])]
        for c in range(n_chunks):  # a rank short of golden solutions runs zero-weight micro-batches (FSDP
            chunk = golds[c * micro_batch : (c + 1) * micro_batch]  # needs the same forwards on every rank)
            metrics = _gold_chunk(
                student, chunk or dummy, obj, gold_totals, pad_id, sums, scale=1.0 if chunk else 0.0
            )
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + float(v)
    acc = dist.reduce_dict(acc)
    sums.values = dist.reduce_dict(sums.values, max_keys=("sample_train_absmax", "teacher_s"))
    out = {k: v for k, v in acc.items() if not k.endswith("weight_sum")}
    for key in obj.metric_names():  # present every step, null when off
        out.setdefault(key, None)
    out.update(
        {
            "loss/total": obj.total(acc),
            "student/logprob_mean": sums.ratio("student_lp", "tokens"),
            "teacher/logprob_mean": sums.ratio("teacher_lp", "tokens"),
            "student/entropy_mean": sums.ratio("entropy", "tokens"),
            "adv/mean": sums.ratio("adv", "tokens"),
            "adv/repetitive_mean": sums.ratio("adv_rep", "rep_tokens"),
            "adv/regular_mean": (
                sums.values.get("adv_reg", 0.0) / (sums.values["tokens"] - sums.values["rep_tokens"])
                if sums.values.get("tokens", 0) > sums.values.get("rep_tokens", 0)
                else None
            ),
            "rollout/rep_token_frac": sums.ratio("rep_tokens", "tokens"),
            "diag/kl_sample_train": sums.ratio("sample_minus_train", "tokens"),
            "diag/logprob_diff_max": sums.values.get("sample_train_absmax"),
        }
    )
    if "teacher_s" in sums.values:  # the teacher's forwards inside the update (JSD), slowest rank
        out["time/teacher_s"] = sums.values["teacher_s"]
    return out


def optimizer_step(
    student,
    optimizer,
    rollouts: list[RolloutSeq],
    golds: list[GoldSeq],
    obj: Objective,
    *,
    ref=None,
    teacher=None,
    pad_id: int,
    micro_batch: int,
    grad_clip: float,
    dist: Dist = SINGLE,
) -> dict[str, Any]:
    """One pass over a batch: zero the gradients, `accumulate` the loss, clip (`grad_clip` 0: no clipping) and
    step, unless the loss or the gradient norm is not finite: then weights and Adam moments stay as they were
    (metric optim/skipped)."""
    optimizer.zero_grad(set_to_none=True)
    with dist.gathered_root(ref), dist.gathered_root(teacher):
        metrics = accumulate(
            student, ref, teacher, rollouts, golds, obj, pad_id=pad_id, micro_batch=micro_batch, dist=dist
        )
    params = [p for p in student.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    finite = math.isfinite(float(norm)) and math.isfinite(metrics["loss/total"])
    metrics["optim/grad_norm"] = float(norm)
    metrics["optim/skipped"] = 0 if finite else 1
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return metrics
