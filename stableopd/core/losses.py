"""Losses of on-policy distillation: shaped advantages, global token weights, the OPD surrogate,
golden-solution SFT and the reference-KL term (the paper's sections 3, 5, 7).

Everything here is a pure function of (B, T) tensors: no model, no config, no state. The trainer
calls them in this order, once per micro-batch:

    adv = shape_advantage(teacher_lp, old_lp, kind, alpha=..., bound=...)          # (B, T), detached
    w = token_weights(mask, aggregation, total_seqs=S, total_tokens=N)             # (B, T)
    opd, m1 = opd_loss(new_lp, old_lp, adv, w, clip_eps=eps_or_None)
    sft, m2 = sft_loss(gold_lp, w_gold)       # w_gold from token_weights on the golden samples
    kl, m3 = ref_kl_loss(kl_t, w)             # kl_t: per-token full-vocab KL(pi_theta || pi_ref)
    loss = opd + gold_coef * sft + ref_kl_coef * kl   # the terms the objective runs, weighted
    loss.backward()

Reduction and normalisation. Every loss is `sum(weights * per_token)`, with no division of its own;
`token_weights` is the one place that normalises, by counts of the *whole* step's batch
(`normalisers(full_mask)`), so summing losses and gradients over micro-batches gives the step's
mean whatever the split. `seq_mean` (default) = token mean per response, then mean over responses;
`token_mean` = token mean over every response token of the step. Golden samples get their own
weights (their own counts), so L_SFT is a mean NLL per golden response, not diluted by rollouts.
Positions with weight 0 are ignored even when they hold nan or inf (padding), and an all-zero
weight tensor gives a loss of exactly 0 with zero gradients. Losses are computed in fp32 (fp64 when
given fp64), whatever the input dtype; metrics are detached 0-dim tensors (no host sync) and are
all weighted sums, so they too add up over micro-batches.

What the OPD gradient optimises. Let d_t = log t(y_t|h_t) - log s(y_t|h_t) for a response y sampled
from the student s, and the loss L = -sum_t A_t log s(y_t|h_t) with A detached (rho = 1).
- Per-token advantage A_t = d_t (the paper and Thinking Machines' recipe: discount 0). Its expected
  gradient is exactly the gradient of  J(theta) = sum_t E_{h_t ~ s_sg}[ KL(s_theta(.|h_t) || t(.|h_t)) ],
  the full-vocabulary reverse KL at each visited prefix with the prefix distribution held fixed
  (stop-gradient on which states the student visits). J has the same value as the sequence-level
  KL(s || t) but not the same gradient: it drops  -E[ sum_t grad log s(y_t|h_t) * sum_{k>t} d_k ],
  the effect of a token on the later tokens' log-ratios.
- Reward-to-go A_t = sum_{k>=t} d_k (`reward_to_go(adv, mask, gamma=1.0)`; config `loss.reward_to_go: 1`)
  makes the expected gradient exactly grad KL(s || t) over whole sequences (EOS and truncation included).
  Both statements hold for token-sum weights (a constant weight per token); tests/test_losses.py checks
  both by exact enumeration. `seq_mean` weights 1/|y| depend on the sampled length, and `token_mean` divides by a
  random count, so with them the same estimators are exact only up to that (length) reweighting.

Deviations from the paper (it gives no code, clip eps or aggregation):
- `clip_eps=None` uses rho * A with rho = exp(new - old) rather than A * log pi; at the first pass
  (old = new.detach()) value and gradient are those of the plain policy gradient, and the value
  equals the clipped loss at rho = 1, so `loss/opd` reads as minus the mean (shaped) advantage.
- Advantage shaping beyond the paper (section 7): `power` (PowerOPD), `clip`, `log_compress`; and an
  optional reward-to-go (`loss.reward_to_go`, the discount gamma), off by default. The adv/* metrics stay
  per token (before the reward-to-go), so they read the same either way.

Exercised by:  pytest tests/test_losses.py
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageKind = Literal["log_ratio", "power", "clip", "log_compress"]
Aggregation = Literal["seq_mean", "token_mean"]
Metrics = dict[str, Tensor]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 if any input is fp64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _masked(x: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    # torch.where, not a product: 0 * nan = nan, and padding may hold nan or -inf.
    return torch.where(keep, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def weighted_sum(per_token: Tensor, weights: Tensor) -> Tensor:
    """sum(weights * per_token) in fp32 (fp64 for fp64 input); positions with weight 0 are skipped."""
    dtype = _compute_dtype(per_token, weights)
    keep = weights != 0
    return (_masked(weights.detach(), keep, dtype) * _masked(per_token, keep, dtype)).sum()


# ----------------------------------------------------------------------------------------------
# Advantages


def shape_advantage(
    teacher_logprobs: Tensor,
    old_logprobs: Tensor,
    kind: AdvantageKind,
    *,
    alpha: float = 5.0,
    bound: float = 1.0,
) -> Tensor:
    """Per-token advantage of each sampled token, detached, fp32 (fp64 for fp64 input), (B, T).

    With d = log pi_T(y_t) - log pi_old(y_t):
    - `log_ratio` (paper): A = d.
    - `power` (PowerOPD): A = p_T^alpha - p_old^alpha in [-1, 1], p = exp(logprob), computed as
      exp(alpha * logp) with logp clamped to <= 0 (bf16 log-probs can round above 0).
    - `clip`: A = clamp(d, -bound, bound).
    - `log_compress`: A = sign(d) * log(1 + |d|), odd and monotone, about d near 0.
    Padding positions are not masked here (they may come out nan); the losses ignore them.
    """
    dtype = _compute_dtype(teacher_logprobs, old_logprobs)
    teacher = teacher_logprobs.detach().to(dtype)  # (B, T)
    old = old_logprobs.detach().to(dtype)  # (B, T)
    if kind == "power":
        if alpha <= 0:
            raise ValueError(f"power advantage needs alpha > 0, got {alpha}")
        return torch.exp(alpha * teacher.clamp_max(0.0)) - torch.exp(alpha * old.clamp_max(0.0))
    d = teacher - old  # (B, T)
    if kind == "log_ratio":
        return d
    if kind == "clip":
        if bound <= 0:
            raise ValueError(f"clip advantage needs bound > 0, got {bound}")
        return d.clamp(-bound, bound)
    if kind == "log_compress":
        return torch.sign(d) * torch.log1p(d.abs())
    raise ValueError(f"unknown advantage kind {kind!r}: use log_ratio, power, clip or log_compress")


def reward_to_go(advantages: Tensor, mask: Tensor, *, gamma: float) -> Tensor:
    """G_t = sum_{k>=t} gamma^(k-t) * A_k * mask_k along each row, detached, (B, T); 0 where masked.

    gamma = 0 returns the per-token advantages (the paper's setting); gamma = 1 turns the log-ratio
    advantage into an unbiased estimator of the sequence-level reverse-KL gradient (module docstring),
    at the price of variance that grows with length. The discount counts positions, so masked holes
    inside a row still discount; the two exact cases (0 and 1) do not depend on that choice.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"reward_to_go needs 0 <= gamma <= 1, got {gamma}")
    keep = mask.bool()
    adv = _masked(advantages.detach(), keep, _compute_dtype(advantages))  # (B, T)
    if gamma == 0.0:
        return adv
    if gamma == 1.0:
        out = adv.flip(-1).cumsum(-1).flip(-1)  # (B, T)
    else:
        out = torch.empty_like(adv)
        running = torch.zeros_like(adv[:, 0])  # (B,)
        for t in range(adv.shape[1] - 1, -1, -1):  # a loop: powers of gamma overflow in closed form
            running = adv[:, t] + gamma * running
            out[:, t] = running
    return torch.where(keep, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# Normalisation: the one place


def normalisers(mask: Tensor) -> tuple[int, int]:
    """(total_seqs, total_tokens) of a step's full response mask (B, T): the arguments of
    `token_weights`. total_seqs counts only responses with at least one token."""
    keep = mask.bool()
    return int((keep.sum(-1) > 0).sum()), int(keep.sum())


def token_weights(
    mask: Tensor,
    aggregation: Aggregation,
    *,
    total_seqs: int,
    total_tokens: int,
) -> Tensor:
    """Per-token weights (B, T), fp32, for one micro-batch of a step, from the step's global counts.

    - `seq_mean`: w_it = mask_it / (len_i * total_seqs), len_i = tokens of response i.
    - `token_mean`: w_it = mask_it / total_tokens.
    `total_seqs` and `total_tokens` must count the whole step (all micro-batches, and all data-parallel
    ranks if gradients are summed across ranks; DDP averages, so multiply by the world size there).
    total_seqs counts only responses with >= 1 token: an empty response has weight 0 and no say in
    the mean. Then sum over micro-batches of sum(w * x) is the step mean of x, whatever the split.
    With no tokens at all, pass 0 for both and every weight is 0.
    """
    keep = mask.bool()
    lengths = keep.sum(-1)  # (B,)
    n_seqs, n_tokens = int((lengths > 0).sum()), int(lengths.sum())
    if n_seqs > total_seqs or n_tokens > total_tokens:
        raise ValueError(
            f"token_weights: this micro-batch has {n_seqs} responses / {n_tokens} tokens but the step "
            f"totals are {total_seqs} / {total_tokens}; pass normalisers(full_step_mask)"
        )
    w = keep.to(torch.float32)  # (B, T)
    if aggregation == "seq_mean":
        per_seq = 1.0 / (lengths.clamp_min(1).to(torch.float32) * max(total_seqs, 1))  # (B,)
        return w * per_seq[:, None]
    if aggregation == "token_mean":
        return w / max(total_tokens, 1)
    raise ValueError(f"unknown aggregation {aggregation!r}: use seq_mean or token_mean")


# ----------------------------------------------------------------------------------------------
# Losses


def opd_loss(
    new_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    *,
    clip_eps: float | None,
) -> tuple[Tensor, Metrics]:
    """OPD surrogate: loss = -sum_t w_t * min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t), a scalar.

    rho = exp(new - old); `old_logprobs` and `advantages` are treated as constants. With
    `clip_eps=None` (one update per batch) the loss is -sum w * rho * A, whose gradient at old =
    new.detach() is exactly the policy gradient -sum w * A * grad(new_logprobs); no clip is needed
    because on-policy there is nothing to clip. Reduction: a weighted sum, normalised by `weights`.

    Metrics (detached 0-dim tensors, weighted sums so they add up over micro-batches; with
    token_weights they are step-level means): loss/opd, opd/ratio_mean, opd/clip_frac
    (tokens whose gradient the clip removed), opd/clip_frac_low, opd/clip_frac_high,
    opd/approx_kl_old (k3 estimate of KL(old || new)), opd/weight_sum (1 over a whole step).
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
    dtype = _compute_dtype(new_logprobs, old_logprobs, advantages, weights)
    keep = weights != 0  # (B, T)
    w = _masked(weights.detach(), keep, dtype)  # (B, T)
    new = _masked(new_logprobs, keep, dtype)  # (B, T)
    old = _masked(old_logprobs.detach(), keep, dtype)  # (B, T)
    adv = _masked(advantages.detach(), keep, dtype)  # (B, T)

    log_ratio = new - old  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    if clip_eps is None:
        low = high = torch.zeros_like(keep)
        surrogate = ratio * adv  # (B, T)
    else:
        # min(rho A, clip(rho) A) written out: the clipped branch is a constant (no gradient) and
        # is taken exactly when rho has left the trust region in the direction A rewards.
        low = (adv < 0) & (ratio < 1.0 - clip_eps)  # (B, T)
        high = (adv > 0) & (ratio > 1.0 + clip_eps)  # (B, T)
        clipped = low | high
        bounded = ratio.detach().clamp(1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
        surrogate = torch.where(clipped, bounded * adv, ratio * adv)  # (B, T)
    loss = -(w * surrogate).sum()

    with torch.no_grad():
        ratio_d = ratio.detach()
        metrics = {
            "loss/opd": loss.detach(),
            "opd/ratio_mean": (w * ratio_d).sum(),
            "opd/clip_frac": (w * (low | high).to(dtype)).sum(),
            "opd/clip_frac_low": (w * low.to(dtype)).sum(),
            "opd/clip_frac_high": (w * high.to(dtype)).sum(),
            "opd/approx_kl_old": (w * (ratio_d - 1.0 - log_ratio.detach())).sum(),
            "opd/weight_sum": w.sum(),
        }
    return loss, metrics


def sft_loss(logprobs: Tensor, weights: Tensor, *, total: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """Golden-solution cross-entropy: loss = -sum w * logprobs, a scalar (weights normalise).

    `logprobs` (B, T) are the student's log-probs of the golden tokens; `weights` from
    `token_weights` on the golden samples' mask with the golden samples' own counts. No golden sample
    in the step (all weights 0) gives exactly 0. `total`: that loss already reduced by a fused kernel
    (kernels.linear_logprobs_sum with token weights -w), used as the loss. Metrics: loss/gold_sft,
    sft/weight_sum.
    """
    loss = -weighted_sum(logprobs, weights) if total is None else total
    weight_sum = weighted_sum(torch.ones_like(weights), weights)
    return loss, {"loss/gold_sft": loss.detach(), "sft/weight_sum": weight_sum}


def ref_kl_loss(
    kl_per_token: Tensor, weights: Tensor, *, tolerance: float = 1e-4, total: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Reference constraint: loss = sum w * KL_t(pi_theta || pi_ref), a scalar, KL_t over the full
    vocabulary at each rollout prefix (from kernels.py); the rollouts' OPD weights average it.

    A KL is never negative: metric ref_kl/negative_frac is the weight of tokens below -tolerance, a
    sign of a numerical bug upstream (it is reported, not clamped). Metrics: loss/ref_kl too.
    `total`: that loss already reduced by a fused kernel (kernels.linear_kl_sum), used as the loss.
    """
    loss = weighted_sum(kl_per_token, weights) if total is None else total
    negative = (kl_per_token.detach() < -tolerance).to(torch.float32)  # (B, T)
    return loss, {"loss/ref_kl": loss.detach(), "ref_kl/negative_frac": weighted_sum(negative, weights)}
