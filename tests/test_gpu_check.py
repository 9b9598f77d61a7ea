"""benchmarks/gpu_check.sh on a machine without CUDA: it refuses in one line with exit 2 and starts nothing.

Its GPU parts run on a CUDA machine (`bash benchmarks/gpu_check.sh`); `GPU_CHECK_DEVICE=cpu` runs the same
plumbing at toy sizes by hand (about a minute, too slow for the suite).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA: the script would run its checks"
)
def test_without_cuda_it_exits_2_in_one_line_and_leaves_no_temp_dir(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA device visible to torch in '{sys.executable}'; this check needs a GPU (exit 2)"
    ]
    assert list(tmp_path.iterdir()) == []
