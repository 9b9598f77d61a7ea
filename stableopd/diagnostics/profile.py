"""Where a distill step's time goes: the `time/*` metrics, and their summary in `diagnose`.

Each metrics.jsonl row of a training step carries the wall seconds between the previous row and its own
(`time/step_s`) and the parts of that interval:

    time/rollout_s  sampling the step's responses (the backend's generate calls and the records)
    time/teacher_s  the teacher's forwards: scoring the responses, or inside the update under objective=jsd
    time/train_s    the update without the teacher: student (and reference) forwards, backward, optimizer step
    time/sync_s     pushing the new weights to the sampler (backend.sync_weights)
    time/val_s      validation, on the steps that validate (0 on the others)
    time/save_s     the checkpoint written after the previous step (0 when none was)
    time/other_s    the rest: the guard, writing rollout records and the row, the step line

so the parts add up to `time/step_s`, and the steps' `time/step_s` add up to the loop's wall time (the
checkpoint after the last step is the only thing outside every row). With K processes each part is the
slowest rank's. Timings are wall clock, so they include any wait for a busy CPU or GPU.

    stableopd diagnose runs/quickstart     # prints the "Time per step" table
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

PARTS = ("rollout", "teacher", "train", "sync", "val", "save", "other")
STEP = "time/step_s"


def key(part: str) -> str:
    return f"time/{part}_s"


class StepClock:
    """Times the interval between metrics rows of the training loop."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.save_s = 0.0

    def close(self, metrics: dict) -> None:
        """Fill `time/save_s`, `time/other_s` and `time/step_s` of the row about to be written; the next
        interval starts now."""
        now = time.perf_counter()
        metrics.setdefault(key("val"), 0.0)
        metrics[key("save")] = self.save_s
        step = now - self.last
        known = sum(float(metrics.get(key(p)) or 0.0) for p in PARTS if p != "other")
        metrics[key("other")] = max(0.0, step - known)
        metrics[STEP] = step
        self.last, self.save_s = now, 0.0

    def add_save(self, seconds: float) -> None:
        self.save_s += seconds


@dataclass(frozen=True)
class PartRow:
    part: str
    median_s: float
    mean_s: float
    share: float  # of the summed step time


def step_profile(series: Mapping[str, Mapping[int, float]]) -> list[PartRow]:
    """Median and mean seconds per part over the training steps (step >= 1), and each part's share of the
    total; the last row is the whole step. Runs written before `time/step_s` existed use the sum of the
    parts they have as the step. Empty when the series hold no timing."""
    steps = sorted(s for s in set().union(*(series.get(key(p), {}) for p in PARTS)) if s >= 1)
    if not steps:
        return []
    parts = [p for p in PARTS if series.get(key(p))]
    cols = {p: [float(series[key(p)].get(s, 0.0)) for s in steps] for p in parts}
    whole = series.get(STEP) or {}
    total = [float(whole[s]) if s in whole else sum(cols[p][i] for p in parts) for i, s in enumerate(steps)]
    grand = sum(total) or 1.0
    rows = [PartRow(p, statistics.median(v), statistics.fmean(v), sum(v) / grand) for p, v in cols.items()]
    return rows + [PartRow("step", statistics.median(total), statistics.fmean(total), sum(total) / grand)]
