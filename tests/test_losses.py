"""Numerical tests of stableopd/core/losses.py against naive references written here.

The key test enumerates every response of a tiny categorical policy (3 tokens, EOS = 2, at most 3
tokens) and checks which objective the OPD gradient follows, exactly, in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stableopd.core.losses import (
    normalisers,
    opd_loss,
    ref_kl_loss,
    reward_to_go,
    sft_loss,
    shape_advantage,
    token_weights,
    weighted_sum,
)

KINDS = ["log_ratio", "power", "clip", "log_compress"]
F64 = torch.float64


def lp(*probs: float) -> torch.Tensor:
    return torch.tensor([list(map(math.log, probs))], dtype=F64)  # (1, T)


# ------------------------------------------------------------------------------------------------
# Advantage shaping


def test_shape_advantage_closed_forms():
    teacher, student = lp(0.5, 0.25, 0.9, 1e-3), lp(0.25, 0.5, 0.9, 0.5)
    d = [math.log(2), -math.log(2), 0.0, math.log(2e-3)]
    expected = {
        "log_ratio": d,
        "power": [0.5**2 - 0.25**2, 0.25**2 - 0.5**2, 0.0, 1e-6 - 0.25],
        "clip": [0.5, -0.5, 0.0, -0.5],
        "log_compress": [math.copysign(math.log1p(abs(x)), x) for x in d],
    }
    for kind, want in expected.items():
        got = shape_advantage(teacher, student, kind, alpha=2.0, bound=0.5)
        torch.testing.assert_close(got, torch.tensor([want], dtype=F64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_teacher_and_student_give_zero_advantage(kind):
    logp = torch.log_softmax(torch.randn(4, 7, 11, dtype=F64), -1)[..., 0].requires_grad_()  # (B, T)
    adv = shape_advantage(logp, logp, kind)
    assert not adv.requires_grad
    assert torch.equal(adv, torch.zeros_like(adv))


def test_power_advantage_is_bounded_and_finite():
    extremes = torch.tensor([0.0, 0.01, -1e-6, -3.0, -1e4, -1e30, -math.inf])  # 0.01: bf16 rounding
    teacher, student = torch.meshgrid(extremes, extremes, indexing="ij")  # (7, 7) every pair
    adv = shape_advantage(teacher, student, "power", alpha=5.0)
    assert torch.isfinite(adv).all() and adv.min() >= -1.0 and adv.max() <= 1.0
    assert adv[0, -1] == 1.0 and adv[-1, 0] == -1.0  # teacher sure / student sure


def test_log_compress_is_odd_monotone_and_contracting():
    d = torch.linspace(-30.0, 30.0, 601, dtype=F64)
    teacher, student = d[None] / 2 - 40.0, -d[None] / 2 - 40.0  # teacher - student = d
    fwd = shape_advantage(teacher, student, "log_compress")[0]
    bwd = shape_advantage(student, teacher, "log_compress")[0]
    torch.testing.assert_close(bwd, -fwd, rtol=0, atol=0)
    assert (fwd.diff() > 0).all()
    assert (fwd.abs() <= d.abs()).all()
    small = d.abs() < 0.05
    torch.testing.assert_close(fwd[small], d[small], rtol=0, atol=2e-3)


def test_clip_advantage_is_identity_inside_the_bound():
    d = torch.linspace(-3.0, 3.0, 61, dtype=F64)[None]  # (1, T)
    adv = shape_advantage(d - 1.0, torch.full_like(d, -1.0), "clip", bound=1.5)
    torch.testing.assert_close(adv, torch.where(d.abs() <= 1.5, d, 1.5 * d.sign()), rtol=0, atol=1e-15)


def test_shape_advantage_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    for kwargs in ({"kind": "power", "alpha": 0.0}, {"kind": "clip", "bound": -1.0}, {"kind": "kl"}):
        with pytest.raises(ValueError):
            shape_advantage(x, x, **kwargs)


def test_reward_to_go_matches_a_python_loop():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(5, 9, dtype=F64, generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.3  # ragged, with holes
    mask[0] = False
    adv[~mask] = math.nan  # padding garbage must not leak
    for gamma in (0.0, 0.5, 0.9, 1.0):
        want = torch.zeros_like(adv)
        for b, t in itertools.product(range(5), range(9)):
            if mask[b, t]:
                want[b, t] = sum(gamma ** (k - t) * adv[b, k] for k in range(t, 9) if mask[b, k])
        torch.testing.assert_close(reward_to_go(adv, mask, gamma=gamma), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Global normalisation across micro-batches


def _ragged_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(6, 12, (1,), generator=g)), int(torch.randint(3, 10, (1,), generator=g))
    mask = torch.rand(B, T, generator=g) > torch.rand(B, 1, generator=g)  # ragged, with holes
    mask[0], mask[1] = False, True  # one empty row, one full row
    theta = torch.randn(B, T, dtype=F64, generator=g).requires_grad_()
    old = (-torch.nn.functional.softplus(theta) + 0.4 * torch.randn(B, T, dtype=F64, generator=g)).detach()
    adv = torch.randn(B, T, dtype=F64, generator=g)
    old[~mask], adv[~mask] = math.nan, math.inf  # padding garbage
    return g, mask, theta, old, adv


def _naive_step_mean(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "token_mean":
        return per_token[mask].sum() / mask.sum()
    rows = [per_token[i][mask[i]].mean() for i in range(len(mask)) if mask[i].any()]
    return torch.stack(rows).mean()


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
@pytest.mark.parametrize("seed", range(6))
def test_any_micro_batch_split_gives_the_full_batch_loss_and_gradient(aggregation, seed):
    g, mask, theta, old, adv = _ragged_batch(seed)
    totals = dict(zip(("total_seqs", "total_tokens"), normalisers(mask), strict=True))

    def loss_of(idx):
        new = -torch.nn.functional.softplus(theta[idx])  # (b, T) log-probs
        w = token_weights(mask[idx], aggregation, **totals)
        return opd_loss(new, old[idx], adv[idx], w, clip_eps=0.2)[0]

    full = loss_of(torch.arange(len(mask)))
    (grad_full,) = torch.autograd.grad(full, theta)
    order = torch.randperm(len(mask), generator=g)
    cuts = sorted(torch.randperm(len(mask) - 1, generator=g)[:3].add(1).tolist())
    split = sum(loss_of(chunk) for chunk in torch.tensor_split(order, cuts))
    (grad_split,) = torch.autograd.grad(split, theta)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_split, grad_full, rtol=1e-12, atol=1e-14)

    new = -torch.nn.functional.softplus(theta)
    ratio = torch.exp(new - old)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    naive = _naive_step_mean(torch.where(mask, per_token, 0.0), mask, aggregation)
    torch.testing.assert_close(full, naive, rtol=1e-6, atol=1e-9)  # weights are fp32


def test_token_weights_closed_form_and_checks():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert normalisers(mask) == (2, 6)
    seq = token_weights(mask, "seq_mean", total_seqs=4, total_tokens=12)
    want = torch.tensor([[1 / 8, 1 / 8, 0, 0], [0, 0, 0, 0], [1 / 16] * 4])
    torch.testing.assert_close(seq, want, rtol=0, atol=0)
    tok = token_weights(mask, "token_mean", total_seqs=4, total_tokens=12)
    torch.testing.assert_close(tok, mask / 12.0, rtol=0, atol=0)
    assert torch.equal(token_weights(mask[1:2], "seq_mean", total_seqs=0, total_tokens=0), torch.zeros(1, 4))
    with pytest.raises(ValueError):  # per-micro-batch counts smaller than the micro-batch itself
        token_weights(mask, "token_mean", total_seqs=2, total_tokens=3)
    with pytest.raises(ValueError):
        token_weights(mask, "sum", total_seqs=2, total_tokens=6)


# ------------------------------------------------------------------------------------------------
# The OPD surrogate, SFT, reference KL, total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(kind, clip_eps):
    new = torch.log_softmax(torch.randn(3, 5, 7), -1)[..., 2].requires_grad_()  # (B, T)
    adv = shape_advantage(new, new, kind)
    w = token_weights(torch.ones(3, 5, dtype=torch.bool), "seq_mean", total_seqs=3, total_tokens=15)
    loss, _ = opd_loss(new, new.detach(), adv, w, clip_eps=clip_eps)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(new.grad, torch.zeros_like(new))


def test_clipped_surrogate_matches_a_per_token_reference_on_both_sides():
    g = torch.Generator().manual_seed(1)
    eps, B, T = 0.2, 4, 16
    old = -torch.rand(B, T, dtype=F64, generator=g) * 3
    new = (old + (torch.rand(B, T, dtype=F64, generator=g) - 0.5)).requires_grad_()  # rho in [0.61, 1.65]
    adv = torch.randn(B, T, dtype=F64, generator=g)
    w = torch.rand(B, T, dtype=F64, generator=g) * (torch.rand(B, T, generator=g) > 0.2)
    loss, metrics = opd_loss(new, old, adv, w, clip_eps=eps)
    (grad,) = torch.autograd.grad(loss, new)

    ref, clipped_low, clipped_high = 0.0, 0.0, 0.0
    for b, t in itertools.product(range(B), range(T)):
        rho = torch.exp(new[b, t] - old[b, t])
        ref = ref - w[b, t] * torch.minimum(rho * adv[b, t], rho.clamp(1 - eps, 1 + eps) * adv[b, t])
        clipped_low += w[b, t].item() * float(adv[b, t] < 0 and rho < 1 - eps)
        clipped_high += w[b, t].item() * float(adv[b, t] > 0 and rho > 1 + eps)
    (ref_grad,) = torch.autograd.grad(ref, new)
    assert clipped_low > 0 and clipped_high > 0  # both sides of the clip are exercised
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert metrics["opd/clip_frac_low"].item() == pytest.approx(clipped_low, rel=1e-12)
    assert metrics["opd/clip_frac_high"].item() == pytest.approx(clipped_high, rel=1e-12)
    assert metrics["opd/clip_frac"].item() == pytest.approx(clipped_low + clipped_high, rel=1e-12)


@pytest.mark.parametrize("clip_eps", [0.2, 0.01])
def test_unclipped_loss_is_the_policy_gradient_and_the_clipped_loss_at_rho_one(clip_eps):
    g = torch.Generator().manual_seed(2)
    new = (-torch.rand(3, 6, dtype=F64, generator=g) * 4).requires_grad_()
    adv, w = torch.randn(3, 6, dtype=F64, generator=g), torch.rand(3, 6, dtype=F64, generator=g)
    plain, m = opd_loss(new, new.detach(), adv, w, clip_eps=None)
    clipped, mc = opd_loss(new, new.detach(), adv, w, clip_eps=clip_eps)
    (g_plain,) = torch.autograd.grad(plain, new)
    (g_clipped,) = torch.autograd.grad(clipped, new)
    assert torch.equal(plain, clipped) and torch.equal(g_plain, g_clipped)
    assert torch.equal(g_plain, -w * adv)  # exactly -sum w A grad(log pi)
    torch.testing.assert_close(plain, -(w * adv).sum(), rtol=1e-15, atol=0)
    assert m["opd/ratio_mean"].item() == pytest.approx(w.sum().item()) and mc["opd/clip_frac"] == 0


def test_sft_and_ref_kl_match_naive_means():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 8, generator=g) > 0.4
    mask[2] = False
    logp = -torch.rand(5, 8, generator=g) * 5
    logp[~mask] = -math.inf
    kl = torch.rand(5, 8, generator=g)
    kl[0, 0] = -0.1  # a bug upstream would give this
    totals = normalisers(mask)
    w = token_weights(mask, "seq_mean", total_seqs=totals[0], total_tokens=totals[1])
    sft, ms = sft_loss(logp, w)
    torch.testing.assert_close(sft, _naive_step_mean(torch.where(mask, -logp, 0.0), mask, "seq_mean"))
    assert ms["sft/weight_sum"].item() == pytest.approx(1.0)
    ref, mr = ref_kl_loss(kl, w)
    torch.testing.assert_close(ref, _naive_step_mean(kl, mask, "seq_mean"))
    assert mr["ref_kl/negative_frac"].item() == pytest.approx(w[0, 0].item() if mask[0, 0] else 0.0)


def test_all_masked_inputs_give_zero_and_no_nan():
    garbage = torch.tensor([[math.nan, math.inf, -math.inf]]).requires_grad_()  # (1, 3)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    w = token_weights(mask, "seq_mean", total_seqs=0, total_tokens=0)
    adv = shape_advantage(garbage, garbage, "log_ratio")
    losses = [
        opd_loss(garbage, garbage, adv, w, clip_eps=0.2),
        opd_loss(garbage, garbage, adv, w, clip_eps=None),
        sft_loss(garbage, w),
        ref_kl_loss(garbage, w),
    ]
    for loss, metrics in losses:
        (grad,) = torch.autograd.grad(loss, garbage)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
        assert all(torch.isfinite(v) for v in metrics.values())
    assert weighted_sum(garbage, w).item() == 0.0
    assert torch.equal(reward_to_go(adv, mask, gamma=1.0), torch.zeros(1, 3))


def test_bf16_inputs_give_fp32_losses_equal_to_upcast_references():
    g = torch.Generator().manual_seed(4)
    new = (-torch.rand(4, 9, generator=g) * 3).bfloat16().requires_grad_()
    teacher = (-torch.rand(4, 9, generator=g) * 3).bfloat16()
    mask = torch.rand(4, 9, generator=g) > 0.3
    w = token_weights(mask, "token_mean", total_seqs=4, total_tokens=int(mask.sum()))
    for kind in KINDS:
        adv = shape_advantage(teacher, new, kind)
        assert adv.dtype == torch.float32
        torch.testing.assert_close(adv, shape_advantage(teacher.float(), new.float(), kind))
        loss, metrics = opd_loss(new, new.detach(), adv, w, clip_eps=0.2)
        assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
        torch.testing.assert_close(loss, -(w * adv).sum())
        loss.backward()
        assert new.grad.dtype == torch.bfloat16 and torch.isfinite(new.grad).all()
    assert sft_loss(new, w)[0].dtype == torch.float32 and ref_kl_loss(new, w)[0].dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Which objective the OPD gradient follows: exact enumeration of a tiny categorical policy

V, EOS, MAX_LEN = 3, 2, 3
PREFIXES = [p for n in range(MAX_LEN) for p in itertools.product(range(V - 1), repeat=n)]  # no EOS inside
RESPONSES = [p + (EOS,) for p in PREFIXES] + [p for p in itertools.product(range(V - 1), repeat=MAX_LEN)]


class Tabular(torch.nn.Module):
    """One free logit vector per prefix."""

    def __init__(self, g):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(len(PREFIXES), V, dtype=F64, generator=g))

    def forward(self, prefix):
        return self.table[PREFIXES.index(prefix)]


class Shared(torch.nn.Module):
    """Parameters shared across prefixes: logits = U[last token or BOS] + P[position]."""

    def __init__(self, g):
        super().__init__()
        self.U = torch.nn.Parameter(torch.randn(V + 1, V, dtype=F64, generator=g))
        self.P = torch.nn.Parameter(torch.randn(MAX_LEN, V, dtype=F64, generator=g))

    def forward(self, prefix):
        return self.U[prefix[-1] if prefix else V] + self.P[len(prefix)]


def _batch_logprobs(model):
    """(B, T) log-probs of every response's tokens, padded with 0, and the (B, T) mask."""
    rows = [[torch.log_softmax(model(y[:t]), -1)[y[t]] for t in range(len(y))] for y in RESPONSES]
    logp = torch.stack([torch.stack(r + [torch.zeros((), dtype=F64)] * (MAX_LEN - len(r))) for r in rows])
    mask = torch.tensor([[t < len(y) for t in range(MAX_LEN)] for y in RESPONSES])
    return logp, mask


def _sequence_reverse_kl(student, teacher):
    """KL(s || t) over whole responses: sum_y s(y) (log s(y) - log t(y))."""
    s_lp, mask = _batch_logprobs(student)
    t_lp, _ = _batch_logprobs(teacher)
    log_s, log_t = (s_lp * mask).sum(-1), (t_lp * mask).sum(-1)  # (B,)
    assert torch.isclose(log_s.exp().sum(), torch.tensor(1.0, dtype=F64))  # a distribution
    return (log_s.exp() * (log_s - log_t)).sum()


def _frozen_state_token_kl(student, teacher):
    """sum over prefixes h of s_sg(h) * KL(s(.|h) || t(.|h)), reach probabilities held fixed."""
    total = torch.zeros((), dtype=F64)
    for h in PREFIXES:
        reach = math.prod(torch.softmax(student(h[:t]), -1)[h[t]].item() for t in range(len(h)))
        log_s, log_t = torch.log_softmax(student(h), -1), torch.log_softmax(teacher(h), -1)  # (V,)
        total = total + reach * (log_s.exp() * (log_s - log_t)).sum()
    return total


def _expected_opd_loss(student, teacher, gamma, clip_eps):
    """E_{y~s}[L_OPD(y)] by enumeration: token-sum weights times the response's probability."""
    new, mask = _batch_logprobs(student)
    with torch.no_grad():
        teacher_lp, _ = _batch_logprobs(teacher)
        prob = (new * mask).sum(-1).exp()  # (B,)
    adv = reward_to_go(shape_advantage(teacher_lp, new, "log_ratio"), mask, gamma=gamma)
    weights = prob[:, None] * mask  # (B, T)
    return opd_loss(new, new.detach(), adv, weights, clip_eps=clip_eps)[0]


def _grad(model, value):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, list(model.parameters()))])


@pytest.mark.parametrize("model_cls", [Tabular, Shared])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("seed", range(3))
def test_opd_gradient_is_exactly_a_reverse_kl_gradient(model_cls, clip_eps, seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = model_cls(g), model_cls(g)

    # (a) reward-to-go log-ratio advantages: grad E[L_OPD] = grad KL(s || t) over whole responses.
    seq_kl = _sequence_reverse_kl(student, teacher)
    grad_seq_kl = _grad(student, seq_kl)
    rtg = _expected_opd_loss(student, teacher, gamma=1.0, clip_eps=clip_eps)
    torch.testing.assert_close(_grad(student, rtg), grad_seq_kl, rtol=1e-10, atol=1e-12)

    # (b) per-token advantages (the paper, discount 0): grad E[L_OPD] = grad of the full-vocabulary
    # reverse KL at each visited prefix with the visit probabilities frozen; same value as (a)'s KL.
    token_kl = _frozen_state_token_kl(student, teacher)
    grad_token_kl = _grad(student, token_kl)
    per_token = _expected_opd_loss(student, teacher, gamma=0.0, clip_eps=clip_eps)
    torch.testing.assert_close(_grad(student, per_token), grad_token_kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token, seq_kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(token_kl, seq_kl, rtol=1e-12, atol=1e-14)

    # ... and the two gradients differ: the per-token one drops the future log-ratios' term.
    assert (grad_seq_kl - grad_token_kl).norm() > 1e-3 * grad_seq_kl.norm()
