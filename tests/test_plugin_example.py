"""The example plugin in examples/plugin_backend is found through the real entry-point registry and
drives the CLI's rollout by name."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from typer.testing import CliRunner

from stableopd.backends.base import available_backends
from stableopd.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_backend"


def test_example_plugin_rollout_by_name(tmp_path, monkeypatch, prompts_file, tiny):
    shutil.copytree(EXAMPLE / "stableopd_uniform", tmp_path / "stableopd_uniform")
    info = tmp_path / "stableopd_uniform-0.1.0.dist-info"  # what `pip install` of the example writes
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stableopd-uniform\nVersion: 0.1.0\n")
    entry = next(
        line for line in (EXAMPLE / "pyproject.toml").read_text().splitlines() if line.startswith("uniform")
    )
    entry = entry.replace(" ", "").replace('"', "")
    (info / "entry_points.txt").write_text(f"[stableopd.backends]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stableopd_uniform", raising=False)
    assert available_backends()["uniform"] == "stableopd_uniform:UniformBackend"

    out = tmp_path / "u.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "rollout",
            "--model",
            "tiny",
            "--data",
            str(prompts_file),
            "--out",
            str(out),
            "-s",
            "sampling.backend=uniform",
            "-s",
            "sampling.n=3",
            "-s",
            "sampling.max_new_tokens=6",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * len(prompts_file.read_text().splitlines())
    vocab = len(tiny.tokenizer)
    for r in rows:
        assert all(lp == -math.log(vocab) for lp in r["sampler_logprobs"])
        assert r["truncated"] == (r["n_tokens"] == 6 and r["finish_reason"] == "length")
