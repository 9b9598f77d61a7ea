"""Learning-rate schedules: constant, linear or cosine decay after a linear warmup.

The rate is a pure function of the step, so a resumed run takes exactly the rates of one that never
stopped. Steps are 1-based: the first optimizer step runs at `lr * 1 / warmup` when there is a warmup.

    lr_at_step(1e-4, step=10, total=100, schedule="cosine", warmup=10, floor=0.1)
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at_step(
    lr: float, *, step: int, total: int, schedule: str = "constant", warmup: int = 0, floor: float = 0.0
) -> float:
    """The rate of `step` (1-based) of `total`: linear warmup over `warmup` steps, then `schedule` from `lr`
    down to `floor * lr` at the last step (constant stays at `lr`)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step <= warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    done = (step - warmup) / max(1, total - warmup)  # 0 just after warmup, 1 at the last step
    shape = 1 - done if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))
    return lr * (floor + (1 - floor) * shape)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
