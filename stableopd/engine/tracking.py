"""metrics.jsonl: one JSON object per step, appended, flushed and fsynced as each step ends.

A run killed mid-write can leave a cut-off last line; on resume `MetricsLog.open(..., keep_until=k)`
rewrites the file (atomically) with only the complete rows of steps <= k, the checkpoint's step, so the
resumed run's file ends exactly as an uninterrupted run's would.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stableopd.files import write_jsonl_atomic


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the cut-off last line of a killed run
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.read_only = False
        self.mirrors: list[
            Callable[[dict[str, Any]], None]
        ] = []  # each written row also goes here (trackers)

    @classmethod
    def open(cls, path: Path, *, keep_until: int | None) -> MetricsLog:
        log = cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is None:
            path.write_text("")
            return log
        log.rows = [r for r in read_rows(path) if r["step"] <= keep_until]
        write_jsonl_atomic(path, log.rows, ensure_ascii=True)
        return log

    @classmethod
    def reader(cls, path: Path, *, keep_until: int | None) -> MetricsLog:
        """The rows `open` would keep, without touching the file; `write` only keeps rows in memory
        (ranks other than 0 of a multi-process run)."""
        log = cls(path)
        log.read_only = True
        log.rows = [] if keep_until is None else [r for r in read_rows(path) if r["step"] <= keep_until]
        return log

    def write(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        for mirror in self.mirrors:
            mirror(row)
        if self.read_only:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
