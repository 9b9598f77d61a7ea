"""The optimizer every stage trains with."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def make_adamw(params: Iterable, lr: float, **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW, with `fused=True` when every parameter lives on CUDA (one kernel per step)."""
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    if tensors and all(p.is_cuda and p.is_floating_point() for p in tensors):
        kwargs.setdefault("fused", True)
    return torch.optim.AdamW(params, lr=lr, **kwargs)
