"""logging.report_to: every tracker for real, offline, read back from its own local store.

One tiny distill run reports to TensorBoard, wandb (offline mode), trackio and MLflow at once; each store is
then read with that tracker's own reader (wandb's offline `.wandb` file with its protobuf records) and must
hold the same `loss/total` series as metrics.jsonl, the config as run parameters and the rollout tables. The
run is then resumed, and every tracker continues the same run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from stableopd.config import load_config
from stableopd.engine.trackers import check_installed, flat_params, scalars
from stableopd.engine.tracking import read_rows
from stableopd.errors import UserError

ALL = "[tensorboard,wandb,trackio,mlflow]"


def test_scalars_keeps_finite_numbers_only():
    row = {
        "step": 3,
        "loss/total": 0.5,
        "optim/skipped": 0,
        "guard/verdict": "healthy",
        "guard/onset_step": None,
        "loss/ref_kl": float("inf"),
        "flag": True,
    }
    assert scalars(row) == {"loss/total": 0.5, "optim/skipped": 0.0}


def test_flat_params_are_dotted_text():
    assert flat_params(
        {"loss": {"ref_kl_coef": 0.01, "objective": "stableopd"}, "out": None, "sampling": {"options": {}}}
    ) == {"loss.ref_kl_coef": "0.01", "loss.objective": "stableopd", "out": "null", "sampling.options": "{}"}


def test_missing_tracker_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    check_installed(["tensorboard"])
    with pytest.raises(
        UserError, match=r"report_to names wandb, which is not installed: pip install 'stableopd\[wandb\]'"
    ):
        check_installed(["tensorboard", "wandb"])


@pytest.mark.parametrize("override, message", [
    ("logging.tensorboard=true", "config key 'logging.tensorboard' does not exist: trackers are listed in "
                                 "logging.report_to"),
    ("logging.report_to=[wandb,wandb]", "names a tracker twice"),
    ("logging.report_to=[neptune]", "logging.report_to.0"),
])  # fmt: skip
def test_bad_report_to_is_a_config_error(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(overrides=[override])


def wandb_history(run_dir: Path, run_id: str) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline run, from its .wandb files (one per launch, oldest first)."""
    history, config = [], {}
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        read_wandb_file(path, history, config)
    return history, config


def read_wandb_file(path: Path, history: list[dict], config: dict) -> None:
    """A LevelDB-format log of wandb's Record protobufs: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
        elif record.WhichOneof("record_type") == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): r[key] for r in rows if r.get(key) is not None}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny, tiny_teacher):
    """A 2-step run with all four trackers, then resumed to 4 steps; (run dir, env)."""
    root = tmp_path_factory.mktemp("trackers")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow's default: RUN_DIR
    env |= {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(root / "trackio"),
        "HOME": str(root),
        "OMP_NUM_THREADS": "1",
    }
    run = root / "run"
    base = [
        sys.executable,
        "-m",
        "stableopd",
        "distill",
        "--student",
        "tiny",
        "--teacher",
        "tiny-teacher",
        "--out",
        str(run),
    ]
    sets = {
        "train.prompts_per_step": 2,
        "sampling.n": 2,
        "sampling.max_new_tokens": 8,
        "train.eval_every": 2,
        "data.val_limit": 2,
        "train.save_every": 2,
        "train.rollouts_every": 2,
        "logging.progress": "false",
        "logging.report_to": ALL,
        "logging.project": "opd-test",
        "logging.table_rows": 3,
        "sampling.backend": "fake",  # the trackers' series need rollouts, not the model's own text
    }
    args = [a for k, v in sets.items() for a in ("-s", f"{k}={v}")]
    first = subprocess.run([*base, *args, "-s", "train.steps=2"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((run / "trackers.json").read_text())
    second = subprocess.run(
        [*base, *args, "-s", "train.steps=4", "--resume"], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    return run, root, ids


def test_every_tracker_holds_the_metrics_series(tracked):
    run, root, ids = tracked
    rows = read_rows(run / "metrics.jsonl")
    want = by_step(rows, "loss/total")
    assert sorted(want) == [1, 2, 3, 4]
    assert json.loads((run / "trackers.json").read_text()) == ids  # the resumed run continued the same runs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    tb.Reload()
    got = {e.step: e.value for e in tb.Scalars("loss/total")}
    assert got == pytest.approx(want, rel=1e-6)  # stored as float32
    assert {e.step: e.value for e in tb.Scalars("val/accuracy")} == pytest.approx(
        by_step(rows, "val/accuracy")
    )
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in tb.Tensors("rollouts/text_summary")}
    assert sorted(texts) == [2, 4] and texts[4].count("\n") == 2 + 3  # header, rule, 3 rows
    assert "ref_kl_coef: 0.01" in tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    history, config = wandb_history(run, ids["wandb"])
    assert by_step(history, "loss/total") == want
    assert config["loss"]["ref_kl_coef"] == 0.01 and config["logging"]["project"] == "opd-test"
    tables = [h for h in history if h.get("rollouts/_type") == "table-file"]
    assert [h["step"] for h in tables] == [2, 4] and all(h["rollouts/nrows"] == 3 for h in tables)

    code = (
        "import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
        "print(json.dumps(S.get_logs('opd-test', sys.argv[1]), default=str))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ids["trackio"]],
        capture_output=True,
        text=True,
        env={**os.environ, "TRACKIO_DIR": str(root / "trackio")},
    )
    logs = json.loads(out.stdout)
    assert by_step(logs, "loss/total") == want
    assert sorted(by_step(logs, "rollouts")) == [2, 4]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "loss/total")} == want
    info = client.get_run(ids["mlflow"])
    assert info.data.params["loss.ref_kl_coef"] == "0.01" and info.info.status == "FINISHED"
    assert info.info.experiment_id == client.get_experiment_by_name("opd-test").experiment_id
    tables = sorted(a.path for a in client.list_artifacts(ids["mlflow"], "rollouts"))
    assert tables == ["rollouts/step_000002.json", "rollouts/step_000004.json"]
    table = json.loads(Path(client.download_artifacts(ids["mlflow"], tables[-1], str(root))).read_text())
    assert table["columns"][:4] == ["step", "prompt_id", "prompt", "response"] and len(table["data"]) == 3


def test_a_failing_tracker_is_switched_off_and_the_others_go_on(capsys):
    from stableopd.engine.trackers import Trackers

    class Broken:
        def log(self, step, values):
            raise ConnectionError("server went away")

    class Kept:
        seen: list = []

        def log(self, step, values):
            self.seen.append((step, values))

    trackers = Trackers({"broken": Broken(), "kept": Kept()})
    trackers.log({"step": 1, "loss/total": 0.5})
    trackers.log({"step": 2, "loss/total": 0.25})
    assert list(trackers.active) == ["kept"] and Kept.seen == [
        (1, {"loss/total": 0.5}),
        (2, {"loss/total": 0.25}),
    ]
    assert "tracker broken failed in log (ConnectionError: server went away)" in capsys.readouterr().err
