"""An lm_head wrapper for sampling tests: one id's logit raised by 50, so it wins every draw unless masked."""

from __future__ import annotations

import torch


class Push(torch.nn.Module):
    def __init__(self, head, token: int):
        super().__init__()
        self.head, self.token = head, token

    def forward(self, x):
        out = self.head(x)
        out[..., self.token] += 50.0
        return out
