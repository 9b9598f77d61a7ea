"""Fused, chunked `hidden @ lm_head.T -> log-softmax -> loss` kernels for the distillation step.

Purpose: every vocabulary-sized quantity of a StableOPD step (student log-probs of sampled tokens for the OPD
term, the golden SFT cross-entropy, teacher scoring, the full-vocabulary KL to the frozen reference and the
optional generalized-JSD objective) goes through this file. Tokens are processed in chunks of `chunk_size`
rows: per chunk the logits (C, V) are computed in fp32, turned into the loss and dropped, so no (N, V)
tensor ever exists; gradients for the hidden states and the weight are accumulated in fp32.

Which to call: `linear_logprobs`, `linear_kl` and `linear_jsd` return per-token values and take any upstream
gradient (e.g. a clipped surrogate whose weights depend on the log-probs). The price is a backward that
recomputes each chunk's logits: one extra matmul against a naive loss (two for the divergences, whose
backward needs both sides), about 1.2x a naive loss's time on CPU. When the per-token weights of the final
sum are known before the forward (on-policy OPD with rho = 1, SFT, a masked or per-response token-mean KL),
the `*_sum` variants compute the gradients during the forward sweep: no more matmuls than a naive loss.

Accuracy: divergence values are kept within ~1e-6 (KL) and ~1e-5 (JSD) relative of an fp64 reference even
for distributions a small step apart at a 50k vocabulary (`_log_mass`, `_jsd_loss`; tests/test_kernels.py).

Conventions: logits are divided by `temperature`. hidden/weight may be any float dtype; all math is fp32
(chunks are upcast; a non-fp32 weight is upcast once per sweep: one (V, d) fp32 copy, 0.9 GB for
Qwen2.5-1.5B's lm_head); outputs are fp32 and gradients come back in the input dtypes. On CUDA the fp32
matmuls follow torch.backends.cuda.matmul.allow_tf32. `vocab_size` keeps only the first `vocab_size` rows
of a weight (embeddings padded past the tokenizer's vocabulary, e.g. Qwen2.5 151,936 vs 152,064). Masked
tokens are dropped before any matmul: they cost nothing, give 0 and receive no gradient. Reduction and
normalisation are the caller's (sum the per-token values, divide once by the global count).
`compile=True` wraps the per-chunk loss math (not the matmuls) in torch.compile; meant for CUDA (on CPU
inductor needs a C++ toolchain).

Deviations from the paper: none in the math; the paper does not say how its KL is computed. The JSD
convention is TRL's and Liger-Kernel's and is spelled out in `linear_jsd`.

Command: `pytest tests/test_kernels.py` and `python benchmarks/bench_kernels.py [--quick]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import Tensor

# 256 rows: a (C, V) fp32 block is 48 MiB at V = 49,152 (148 MiB at Qwen's 151,936). Every chunk streams
# the weight three times and the fp32 weight gradient once, so much smaller chunks are slower on CPU; 512
# already lifts the logprobs peak past 1/8 of the naive one at N = 4096 (benchmarks/bench_kernels.py --chunks).
DEFAULT_CHUNK_SIZE = 256
COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" to exercise the compile path without a C compiler

Kernel = Callable[..., "tuple[Tensor | None, Tensor | None]"]

# ----------------------------------------------------------------------------------------------------
# Per-chunk losses on log-probabilities. `ls` (C, V) are the student's fp32 log-probs (temperature already
# applied), `lt` (C, V) the other side's; both may be overwritten, as may the `scratch` buffers. A kernel
# returns the per-token outputs (C, k) when `want_out`, and, when `g` (C, k) is given, the gradient of
# sum(g * out) with respect to the student logits, (C, V), written into one of the buffers. Every (C, V)
# tensor lives in a buffer that the sweep allocates once: on CPU a fresh 50-150 MB allocation per op is
# served by mmap and page-faulted in again every time, which costs as much as the matmul itself.


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0]  # (C, 1) without a (C, V) product temporary


def _logprobs_loss(ls, targets, g, scratch, want_out):
    """out = [log p(target), entropy]; g (C, 1) differentiates the log-prob only, (C, 2) both."""
    p = torch.exp(ls, out=scratch[0])  # (C, V)
    need_ent = want_out or (g is not None and g.shape[1] == 2)
    ent = -_rowdot(p, ls) if need_ent else None  # (C, 1)
    out = torch.cat([ls.gather(1, targets[:, None]), ent], 1) if want_out else None  # (C, 2)
    if g is None:
        return out, None
    g_lp = g[:, :1]  # (C, 1)
    # d lp / dz = onehot(y) - p;  d ent / dz = -p * (log p + ent)
    gz = p.mul_(-g_lp) if g.shape[1] == 1 else ls.add_(ent).mul_(g[:, 1:]).add_(g_lp).mul_(p).neg_()
    return out, gz.scatter_add_(1, targets[:, None], g_lp)


_GROUP = 64


def _log_mass(p: Tensor) -> Tensor:
    """log(sum p) per row, accurate to ~1e-9: (C, 1). fp32's log-softmax leaves each row's normaliser off by up to
    ~1e-7 absolute (its log-sum-exp is of magnitude log V), the same for every entry of the row; a divergence
    of two such rows carries the difference of the two offsets, most of a small KL. The row's mass shows it."""
    return torch.log(_mass(p)).float()[:, None]


def _log_mass_of_exp(logp: Tensor, block: int = 128 * _GROUP) -> Tensor:
    """`_log_mass(exp(logp))` without a (C, V) buffer for exp(logp): column blocks of `block` entries."""
    mass = sum(_mass(torch.exp(part)) for part in logp.split(block, dim=1))
    return torch.log(mass).float()[:, None]


def _mass(p: Tensor) -> Tensor:
    """sum p per row, (C,) fp64: groups of 64 summed in fp32 (a few ulps of 1/750 of the mass each), the group
    sums in fp64; the mass to ~1e-9 for the price of an fp32 sum, where an fp64 sum of the whole row costs
    half a matmul on CPU."""
    c, v = p.shape
    head = v - v % _GROUP
    mass = p[:, :head].reshape(c, head // _GROUP, _GROUP).sum(-1).sum(-1, dtype=torch.float64)  # (C,)
    if head < v:
        mass += p[:, head:].sum(-1, dtype=torch.float64)
    return mass


def _kl_loss(ls, lt, g, scratch, want_out, *, reverse: bool):
    if reverse:  # KL(s || t) = sum ps (ls - lt);  d/dzs = ps * (ls - lt - KL)
        ps = torch.exp(ls, out=scratch[0])  # (C, V)
        shift = _log_mass(ps) - _log_mass_of_exp(lt) if want_out else 0.0  # (C, 1)
        diff = ls.sub_(lt)  # (C, V)
        kl = _rowdot(ps, diff)  # (C, 1)
        out = (
            kl - shift if want_out else None
        )  # the rows renormalised (dividing by mass_s ~ 1 is below rounding)
        return out, (None if g is None else diff.sub_(kl).mul_(ps).mul_(g))
    # KL(t || s) = sum pt (lt - ls);  d/dzs = ps - pt. pt underflowing to 0 gives 0 * finite = 0.
    pt = torch.exp(lt, out=scratch[0])  # (C, V)
    if want_out:
        shift = _log_mass(pt) - _log_mass_of_exp(ls)  # (C, 1)
        kl = _rowdot(pt, lt.sub_(ls)) - shift  # (C, 1)
    else:
        kl = None
    return kl, (None if g is None else torch.exp(ls, out=lt).sub_(pt).mul_(g))


def _jsd_loss(ls, lt, g, scratch, want_out, *, beta: float):
    """0 < beta < 1 (the endpoints are the KL kernels): m = (1 - beta) ps + beta pt,
    JSD = beta KL(t || m) + (1 - beta) KL(s || m).

    Written on r = log(pt / ps): log(ps / m) = -log((1 - beta) + beta e^r) = -logaddexp(log(1 - beta), r +
    log beta) and log(pt / m) = r + log(ps / m). Both are small where the two distributions agree, so they
    keep fp32's relative precision; forming log m itself (magnitude log V) and subtracting it from ls and lt
    would lose about 1e-6 absolute per term, which is most of a small divergence."""
    r = lt.sub_(ls)  # (C, V) log(pt / ps)
    ps = torch.exp(ls, out=scratch[0])  # (C, V)
    pt = ls.add_(r).exp_() if want_out else None  # (C, V) in ls's buffer: exp(ls + r) = pt
    d_s = torch.add(r, math.log(beta), out=scratch[1])  # (C, V)
    d_s = torch.logaddexp(
        torch.full((), math.log1p(-beta), device=r.device), d_s, out=d_s
    ).neg_()  # log(ps / m)
    kl_sm = _rowdot(ps, d_s)  # (C, 1) KL(s || m)
    kl_tm = _rowdot(pt, r.add_(d_s)) if want_out else None  # (C, 1) KL(t || m) = sum pt log(pt / m)
    out = (1.0 - beta) * kl_sm + beta * kl_tm if want_out else None  # (C, 1)
    # d JSD / d ps = (1 - beta) * log(ps / m) (the terms from m cancel), then through the softmax.
    return out, (None if g is None else d_s.sub_(kl_sm).mul_(ps).mul_(g * (1.0 - beta)))


_COMPILED: dict[object, Kernel] = {}


def _maybe_compile(kernel: Kernel, compile: bool) -> Kernel:
    if not compile:
        return kernel
    key = (kernel.func, tuple(sorted(kernel.keywords.items()))) if isinstance(kernel, partial) else kernel
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(kernel, dynamic=True, backend=COMPILE_BACKEND)
    return _COMPILED[key]


# ----------------------------------------------------------------------------------------------------
# The chunked sweep shared by forward, backward and the fused-sum variants.


def _sweep(
    spec: tuple, h: Tensor, w: Tensor, other: tuple, g: Tensor | None, want: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Run spec = (kernel, n_scratch, chunk, inv_t, swaps) over row chunks of h (N, d) against w (V, d).
    `other` is (targets (N,),) or the other side's (h_t (N, d_t), w_t (V, d_t)), whose log-prob columns a, b
    are exchanged for each (a, b) in swaps. want = (outputs, grad h, grad w); the grads are fp32 grads of
    sum(g * out), computed only when g (N, k) is given."""
    kernel, n_scratch, chunk, inv_t, swaps = spec
    n, v = h.shape[0], w.shape[0]
    w32 = w.float()  # (V, d) no copy when already fp32
    w_t32 = other[1].float() if len(other) == 2 else None  # (V, d_t)
    n_bufs = 1 + n_scratch + (w_t32 is not None)  # z, ls, lt, then spare scratch
    bufs = torch.empty(n_bufs, min(chunk, max(n, 1)), v, device=h.device)  # (B, C, V) reused by every chunk
    grad_h = torch.empty(n, h.shape[1], device=h.device) if g is not None and want[1] else None  # (N, d)
    grad_w = torch.zeros_like(w32) if g is not None and want[2] else None  # (V, d)
    outs = []
    for start in range(0, max(n, 1), chunk):  # n == 0 still runs one empty chunk: (0, k) out, zero grads
        rows = slice(start, min(start + chunk, n))
        z, ls = bufs[0, : rows.stop - start], bufs[1, : rows.stop - start]  # (C, V) each
        if w_t32 is not None:
            lt = bufs[2, : rows.stop - start]  # (C, V)
            torch.log_softmax(torch.mm(other[0][rows].float() * inv_t, w_t32.T, out=z), -1, out=lt)
            for a, b in swaps:
                lt[:, [a, b]] = lt[:, [b, a]]
        hc = h[rows].float() * inv_t  # (C, d) temperature folded into the small side
        torch.log_softmax(torch.mm(hc, w32.T, out=z), -1, out=ls)
        aux = other[0][rows] if w_t32 is None else lt
        scratch = [
            z,
            *(b[: rows.stop - start] for b in bufs[2 + (w_t32 is not None) :]),
        ]  # z + spares after ls, lt
        out, gz = kernel(ls, aux, None if g is None else g[rows], scratch, want[0])  # (C, k), (C, V)
        outs.append(out)
        if grad_h is not None:
            grad_h[rows] = torch.mm(gz, w32).mul_(inv_t)  # (C, d)
        if grad_w is not None:
            grad_w.addmm_(gz.T, hc)  # (V, d)
    return (torch.cat(outs) if want[0] else None), grad_h, grad_w


def _cast(grad: Tensor | None, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor | None:
    if grad is None:
        return None
    return (grad if scale is None else grad * scale).to(dtype)


class _ChunkedLoss(torch.autograd.Function):
    """Per-token outputs (N, k) with arbitrary upstream gradients; the backward recomputes each chunk.
    For linear_logprobs the two outputs are separate so that an unused entropy costs nothing."""

    @staticmethod
    def forward(ctx, h, w, other_a, other_b, spec):
        other = (other_a,) if other_b is None else (other_a, other_b)
        ctx.save_for_backward(h, w, other_a, other_b)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        out = _sweep(spec, h, w, other, None, (True, False, False))[0]  # (N, k)
        return tuple(col.clone() for col in out.unbind(1))  # separate tensors, not views of one another

    @staticmethod
    def backward(ctx, *g_outs):
        h, w, other_a, other_b = ctx.saved_tensors
        other = (other_a,) if other_b is None else (other_a, other_b)
        if all(g is None for g in g_outs):
            return None, None, None, None, None
        if len(g_outs) == 2 and g_outs[1] is None:  # entropy unused: its gradient term is skipped
            g_outs = g_outs[:1]
        g = torch.stack(
            [torch.zeros(h.shape[0], device=h.device) if x is None else x.float() for x in g_outs], 1
        )
        want = (False, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        _, grad_h, grad_w = _sweep(ctx.spec, h, w, other, g, want)
        return _cast(grad_h, h.dtype), _cast(grad_w, w.dtype), None, None, None


class _ChunkedSum(torch.autograd.Function):
    """Scalar sum(g * out) with g (N, k) known up front: the gradients come out of the forward sweep."""

    @staticmethod
    def forward(ctx, h, w, other_a, other_b, g, spec):
        other = (other_a,) if other_b is None else (other_a, other_b)
        want = (True, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        out, grad_h, grad_w = _sweep(spec, h, w, other, g.float(), want)
        ctx.save_for_backward(grad_h, grad_w, out)
        ctx.mark_non_differentiable(out)
        ctx.k, ctx.dtypes = g.shape[1], (h.dtype, w.dtype)
        return (g.float() * out[:, : g.shape[1]]).sum(), out  # g may cover the first columns only

    @staticmethod
    def backward(ctx, g_total, _g_out):
        grad_h, grad_w, out = ctx.saved_tensors
        g_g = out[:, : ctx.k] * g_total if ctx.needs_input_grad[4] else None
        return (
            _cast(grad_h, ctx.dtypes[0], g_total),
            _cast(grad_w, ctx.dtypes[1], g_total),
            None,
            None,
            g_g,
            None,
        )


# ----------------------------------------------------------------------------------------------------
# Public API.


def _prepare(hidden: Tensor, mask: Tensor | None, chunk_size: int, temperature: float):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    idx = None if mask is None else mask.reshape(-1).bool().nonzero().squeeze(1)  # (M,) kept rows
    if idx is not None and idx.numel() == h.shape[0]:
        idx = None  # nothing masked: skip the gather / scatter copies
    return hidden.shape[:-1], h, idx


def _take(x: Tensor, idx: Tensor | None) -> Tensor:
    return x if idx is None else x.index_select(0, idx)


def _put(out: Tensor, idx: Tensor | None, n: int) -> Tensor:
    return out if idx is None else out.new_zeros(n, *out.shape[1:]).index_copy(0, idx, out)  # (N, ...)


def _vocab(vocab_size: int | None, *weights: Tensor) -> int:
    v = min(w.shape[0] for w in weights) if vocab_size is None else vocab_size
    if not 0 < v <= min(w.shape[0] for w in weights):
        raise ValueError(f"vocab_size={v} must be in [1, {min(w.shape[0] for w in weights)}] (weight rows)")
    return v


def _logprobs_args(hidden, weight, targets, mask, chunk_size, temperature, vocab_size):
    lead, h, idx = _prepare(hidden, mask, chunk_size, temperature)
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size {h.shape[1]} does not match weight {tuple(weight.shape)}")
    v = _vocab(vocab_size, weight)
    tgt = _take(targets.reshape(-1), idx)  # (M,)
    if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= v):
        raise ValueError(f"targets must lie in [0, {v}); got [{int(tgt.min())}, {int(tgt.max())}]")
    return lead, h.shape[0], idx, (_take(h, idx), weight[:v], tgt, None)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy under softmax(hidden @ weight[:vocab_size].T / temperature).

    hidden (..., d), weight (V, d), targets (...) token ids in [0, vocab_size), optional mask (...) (False:
    output 0, no gradient, no compute). Returns fp32 `(logprobs (...), entropy (...))`, differentiable in
    hidden and weight under any upstream gradients; the backward recomputes each chunk's logits (and skips
    the entropy term when the entropy gets no gradient). Call under `torch.no_grad()` for teacher scoring.
    """
    lead, n, idx, args = _logprobs_args(hidden, weight, targets, mask, chunk_size, temperature, vocab_size)
    spec = (_maybe_compile(_logprobs_loss, compile), 1, chunk_size, 1.0 / temperature, ())
    lp, ent = _ChunkedLoss.apply(*args, spec)  # (M,) each
    return _put(lp, idx, n).reshape(lead), _put(ent, idx, n).reshape(lead)


def linear_logprobs_sum(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor,
    *,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """`(sum(token_weights * logprobs), logprobs, entropy)` with the sum over unmasked tokens.

    Same inputs as `linear_logprobs` plus token_weights (...) (e.g. -advantage / count for the on-policy
    OPD term, -1 / count for SFT). Only the scalar is differentiable (in hidden, weight, token_weights);
    its gradients are computed during the forward sweep, so nothing is recomputed: the fast path when the
    per-token weights are known before the forward. logprobs and entropy (...) come back detached.
    """
    lead, n, idx, args = _logprobs_args(hidden, weight, targets, mask, chunk_size, temperature, vocab_size)
    tw = _take(token_weights.reshape(-1), idx)[:, None]  # (M, 1): the entropy is not part of the sum
    spec = (_maybe_compile(_logprobs_loss, compile), 1, chunk_size, 1.0 / temperature, ())
    total, out = _ChunkedSum.apply(*args, tw, spec)
    out = _put(out, idx, n)  # (N, 2)
    return total, out[:, 0].reshape(lead), out[:, 1].reshape(lead)


def _divergence(
    kernel,
    n_scratch,
    s_h,
    s_w,
    t_h,
    t_w,
    mask,
    token_weights,
    chunk_size,
    temperature,
    vocab_size,
    compile,
    swaps=(),
):
    lead, h, idx = _prepare(s_h, mask, chunk_size, temperature)
    h_t = t_h.reshape(-1, t_h.shape[-1])  # (N, d_t)
    if h.shape[0] != h_t.shape[0] or h.shape[1] != s_w.shape[1] or h_t.shape[1] != t_w.shape[1]:
        raise ValueError(
            f"shapes do not match: student {tuple(s_h.shape)} x {tuple(s_w.shape)}, "
            f"other {tuple(t_h.shape)} x {tuple(t_w.shape)}"
        )
    v = _vocab(vocab_size, s_w, t_w)
    swaps = tuple((int(a), int(b)) for a, b in swaps if a != b)
    if any(not (0 <= i < v) for pair in swaps for i in pair):
        raise ValueError(f"swap_other ids {swaps} must be in [0, {v})")
    # The other side is detached: no gradient ever reaches the teacher / reference tensors.
    args = (_take(h, idx), s_w[:v], _take(h_t.detach(), idx), t_w.detach()[:v])
    spec = (_maybe_compile(kernel, compile), n_scratch, chunk_size, 1.0 / temperature, swaps)
    if token_weights is None:
        (out,) = _ChunkedLoss.apply(*args, spec)  # (M,)
        return _put(out, idx, h.shape[0]).reshape(lead)
    g = _take(token_weights.reshape(-1), idx)[:, None]  # (M, 1)
    total, out = _ChunkedSum.apply(*args, g, spec)
    return total, _put(out, idx, h.shape[0])[:, 0].reshape(lead)


def _kl_kernel(direction: str) -> tuple[Kernel, int]:
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    return partial(_kl_loss, reverse=direction == "reverse"), 1


def _jsd_kernel(beta: float) -> tuple[Kernel, int]:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta in (0.0, 1.0):  # exact endpoints, computed without a log(0) from a zero mixture weight
        return _kl_kernel("forward" if beta == 0.0 else "reverse")
    return partial(_jsd_loss, beta=float(beta)), 2  # a buffer for log m


def linear_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    direction: str = "reverse",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compile: bool = False,
    swap_other: Iterable[tuple[int, int]] = (),
) -> Tensor:
    """Per-token full-vocabulary KL between the student's and the reference's next-token distributions.

    student_hidden (..., d_s) with student_weight (V_s, d_s); ref_hidden (..., d_r) with ref_weight
    (V_r, d_r); mask (...) or None. Both weights are cut to vocab_size (default min(V_s, V_r)).
    direction "reverse": KL(student || ref) = sum_v p_s (log p_s - log p_r); "forward": KL(ref || student).
    Returns fp32 (...), 0 at masked positions. Differentiable in the student side only (any upstream
    gradient; the backward recomputes both sides' logits per chunk). `swap_other` lists (a, b) id pairs whose
    columns are exchanged in the other side's distribution (a teacher's own end token read at the
    student's: stableopd/models/pairing.py).
    """
    return _divergence(
        *_kl_kernel(direction),
        student_hidden,
        student_weight,
        ref_hidden,
        ref_weight,
        mask,
        None,
        chunk_size,
        temperature,
        vocab_size,
        compile,
        swap_other,
    )


def linear_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    compile: bool = False,
    swap_other: Iterable[tuple[int, int]] = (),
) -> Tensor:
    """Per-token generalized Jensen-Shannon divergence over the full vocabulary.

    Convention (TRL's `generalized_jsd_loss` and Liger-Kernel's), with p_s the student and p_t the teacher
    distribution, so a `beta` copied from a TRL GKD config means the same divergence here:
      0 < beta < 1:  m = (1 - beta) * p_s + beta * p_t,
                     JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)   (beta = 0.5: the usual JSD)
      beta == 0:     KL(p_t || p_s)  (forward KL)
      beta == 1:     KL(p_s || p_t)  (reverse KL)
    The endpoints are definitions, not limits: JSD_beta itself tends to 0 at both ends (near beta = 0 it is
    about beta * KL(p_t || p_s)), so the family jumps there. Endpoints run the KL kernels, never log(0);
    log m is formed with logaddexp. Shapes, masking, vocab_size, swap_other and gradients as in `linear_kl`.
    """
    return _divergence(
        *_jsd_kernel(beta),
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        mask,
        None,
        chunk_size,
        temperature,
        vocab_size,
        compile,
        swap_other,
    )


def _ones_like_tokens(hidden: Tensor, token_weights: Tensor | None) -> Tensor:
    return torch.ones(hidden.shape[:-1], device=hidden.device) if token_weights is None else token_weights


def linear_kl_sum(
    student_hidden: Tensor,
    student_weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    mask: Tensor | None,
    token_weights: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    direction: str = "reverse",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compile: bool = False,
    swap_other: Iterable[tuple[int, int]] = (),
) -> tuple[Tensor, Tensor]:
    """`(sum(token_weights * kl), kl)`: `linear_kl` reduced inside the forward sweep (nothing recomputed).

    token_weights (...) defaults to 1, a plain masked sum (divide by the global count yourself; a
    per-response token mean is token_weights = 1 / length). Only the scalar is differentiable.
    """
    g = _ones_like_tokens(student_hidden, token_weights)
    return _divergence(
        *_kl_kernel(direction),
        student_hidden,
        student_weight,
        ref_hidden,
        ref_weight,
        mask,
        g,
        chunk_size,
        temperature,
        vocab_size,
        compile,
        swap_other,
    )


def linear_jsd_sum(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor | None,
    token_weights: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_size: int | None = None,
    compile: bool = False,
    swap_other: Iterable[tuple[int, int]] = (),
) -> tuple[Tensor, Tensor]:
    """`(sum(token_weights * jsd), jsd)`: `linear_jsd` reduced inside the forward sweep, as `linear_kl_sum`."""
    g = _ones_like_tokens(student_hidden, token_weights)
    return _divergence(
        *_jsd_kernel(beta),
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        mask,
        g,
        chunk_size,
        temperature,
        vocab_size,
        compile,
        swap_other,
    )
