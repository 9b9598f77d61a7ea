"""fp64-reference error of the divergence kernels' values and gradients at a real vocabulary.

Purpose: the accuracy of `linear_kl` / `linear_jsd` and their `_sum` forms, per-token and summed, against the
same loss computed in fp64 from full logits. Setting: 64 tokens, d=64, V=49152 (SmolLM2's vocabulary),
random weights; "close" puts the second model a small step from the student (KL ~1e-3 per token, as in the
reference-KL term early in a run), "far" draws it independently. Token weights uniform in [0, 1), chunks of
32 tokens. Errors: |value - fp64| / |fp64|, and ||grad - fp64 grad|| / ||fp64 grad|| for the hidden states
and the head's weight.
Deviations: none; the paper has no kernels. Run it from another checkout (PYTHONPATH) to compare versions.

Command: OMP_NUM_THREADS=1 python benchmarks/kernel_accuracy.py
"""

from __future__ import annotations

import math

import torch

from stableopd.core import kernels as K


def setup(close: bool):
    """Student hidden states and head, the other model's, and token weights."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 64, 64, 49152
    hs, ws = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.15
    if close:
        ht, wt = hs + 0.03 * torch.randn(n, d, generator=g), ws + 0.002 * torch.randn(v, d, generator=g)
    else:
        ht, wt = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.15
    return hs, ws, ht, wt, torch.rand(n, generator=g)


def ref(case, hs, ws, ht, wt, tw):
    """The weighted loss and its gradients in fp64 from full logits (TRL's JSD convention)."""
    hs64, ws64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ls = torch.log_softmax(hs64 @ ws64.T, -1)
    with torch.no_grad():
        lt = torch.log_softmax(ht.double() @ wt.double().T, -1)
    if case.startswith("kl"):
        per = (ls.exp() * (ls - lt)).sum(-1) if case == "kl-reverse" else (lt.exp() * (lt - ls)).sum(-1)
    else:
        b = float(case.split("-")[1])
        lm = torch.logaddexp(ls + math.log1p(-b), lt + math.log(b))
        per = b * (lt.exp() * (lt - lm)).sum(-1) + (1 - b) * (ls.exp() * (ls - lm)).sum(-1)
    val = (tw.double() * per).sum()
    val.backward()
    return float(val.detach()), hs64.grad, ws64.grad


def ours(case, api, hs, ws, ht, wt, tw):
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    kw = dict(chunk_size=32)
    if case.startswith("kl"):
        fn = K.linear_kl_sum if api == "sum" else K.linear_kl
        kw["direction"] = case.split("-")[1]
    else:
        fn = K.linear_jsd_sum if api == "sum" else K.linear_jsd
        kw["beta"] = float(case.split("-")[1])
    if api == "sum":
        val = fn(hs, ws, ht, wt, None, tw, **kw)[0]
    else:
        val = (fn(hs, ws, ht, wt, None, **kw) * tw).sum()
    val.backward()
    return float(val.detach()), hs.grad, ws.grad


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def main() -> None:
    torch.set_num_threads(1)
    print("| distributions | loss | kernel | value rel. error | grad h rel. error | grad W rel. error |")
    print("|---|---|---|---|---|---|")
    for close in (True, False):
        t = setup(close)
        for case in ("kl-reverse", "kl-forward", "jsd-0.5", "jsd-0.1"):
            rv, rh, rw = ref(case, *t)
            for api in ("per-token", "sum"):
                v, h, w = ours(case, api, *t)
                print(
                    f"| {'close' if close else 'far'} | {case} | {api} | {abs(v - rv) / abs(rv):.1e} | "
                    f"{rel(h, rh):.1e} | {rel(w, rw):.1e} |"
                )


if __name__ == "__main__":
    main()
