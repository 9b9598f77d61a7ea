"""Experiment trackers: `logging.report_to: [tensorboard, wandb, trackio, mlflow]`, any subset.

Each gets the rows metrics.jsonl gets, under the same names (rollout/*, loss/*, val/*, guard/*, time/*;
numbers only, at the row's `step`), the resolved config as run parameters, and a table of the first
`logging.table_rows` rollouts whenever rollouts/step_N.jsonl is written. metrics.jsonl stays the record
that `diagnose` and `--resume` read: a tracker that fails mid-run is switched off with a warning and the run
goes on.

Where each one writes:
    tensorboard   RUN_DIR/tensorboard (the rollout table as a markdown text summary)
    wandb         its own settings (WANDB_MODE, WANDB_API_KEY); files under RUN_DIR/wandb
    trackio       its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio) or TRACKIO_SPACE_ID
    mlflow        MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db with artifacts in RUN_DIR/mlruns

`--resume` continues the same tracker run (its id is kept in RUN_DIR/trackers.json); rows after the
checkpoint that the killed run had already sent are sent again at the same steps.

    stableopd distill -c examples/quickstart.yaml -s logging.report_to=[tensorboard,wandb]
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from stableopd.errors import UserError
from stableopd.files import write_text_atomic
from stableopd.progress import console

# tracker -> (module it needs, the pip extra that installs it)
MODULES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
TABLE_COLUMNS = ("step", "prompt_id", "prompt", "response", "n_tokens", "truncated", "repetitive")


def check_installed(names: list[str]) -> None:
    """Exit 2 naming the pip command when a tracker in logging.report_to is not installed (nothing imported)."""
    for name in names:
        module, extra = MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"logging.report_to names {name}, which is not installed: pip install 'stableopd[{extra}]'"
            )


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (strings such as guard/verdict, nulls and infinities are left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"loss.ref_kl_coef": "0.01", ...}: the config as one level of text values (MLflow's parameters)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def table_rows(step: int, records: list[dict[str, Any]], limit: int) -> list[list[Any]]:
    return [[step, *(r.get(c) for c in TABLE_COLUMNS[1:])] for r in records[:limit]]


class TensorBoard:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        project: str,
        state: dict[str, Any],
        start: int,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a killed run wrote after its checkpoint
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        if not start:
            self.writer.add_text("config", "```yaml\n" + _yaml(config) + "```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def table(self, step: int, rows: list[list[Any]]) -> None:
        head = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
        body = "".join("| " + " | ".join(_cell(v) for v in row) + " |\n" for row in rows)
        self.writer.add_text("rollouts", head + body, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandB:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        project: str,
        state: dict[str, Any],
        start: int,
    ) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), config=config, id=state.get("wandb"), resume="allow"
        )
        # every series is plotted against the row's step, so a resumed run may send a step again
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        state["wandb"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def table(self, step: int, rows: list[list[Any]]) -> None:
        self.run.log({"step": step, "rollouts": self.wandb.Table(columns=list(TABLE_COLUMNS), data=rows)})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        project: str,
        state: dict[str, Any],
        start: int,
    ) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project,
            name=state.get("trackio", name),
            config=config,
            resume="allow",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
        state["trackio"] = self.run.name

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def table(self, step: int, rows: list[list[Any]]) -> None:
        import pandas

        frame = pandas.DataFrame(rows, columns=list(TABLE_COLUMNS))
        self.run.log({"rollouts": self.trackio.Table(dataframe=frame)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


class MLflow:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        project: str,
        state: dict[str, Any],
        start: int,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id := state.get("mlflow"):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    project,
                    artifact_location=None
                    if "MLFLOW_TRACKING_URI" in os.environ
                    else (run_dir / "mlruns").resolve().as_uri(),
                )
            )
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        state["mlflow"] = self.run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def table(self, step: int, rows: list[list[Any]]) -> None:
        data = {c: [row[i] for row in rows] for i, c in enumerate(TABLE_COLUMNS)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"rollouts/step_{step:06d}.json")

    def close(self, failed: bool) -> None:  # a stopped run (signal, collapse, error) ends as FAILED
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


class Trackers:
    """Every tracker in logging.report_to for one run (rank 0 only); `Trackers.none()` does nothing."""

    def __init__(self, active: dict[str, Any], table_limit: int = 0) -> None:
        self.active = active
        self.table_limit = table_limit

    @classmethod
    def none(cls) -> Trackers:
        return cls({})

    @classmethod
    def open(
        cls,
        names: list[str],
        *,
        run_dir: Path,
        config: dict[str, Any],
        project: str,
        run_name: str | None,
        start: int,
        table_limit: int,
    ) -> Trackers:
        check_installed(names)
        state_file = run_dir / "trackers.json"
        state = json.loads(state_file.read_text()) if start and state_file.exists() else {}
        active = {}
        for name in names:
            try:
                active[name] = KINDS[name](
                    run_dir, config, run_name or run_dir.resolve().name, project, state, start
                )
            except Exception as exc:  # a tracker that cannot start never stops the run
                _warn(name, "could not start", exc)
        write_text_atomic(state_file, json.dumps(state, indent=1) + "\n")
        return cls(active, table_limit)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        self._each("log", int(row["step"]), values)

    def table(self, step: int, records: list[dict[str, Any]]) -> None:
        if self.table_limit and records:
            self._each("table", step, table_rows(step, records, self.table_limit))

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.active = {}

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                _warn(name, f"failed in {method}", exc)
                del self.active[name]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(failed=exc_type is not None)


def _warn(name: str, what: str, exc: Exception) -> None:
    console.print(
        f"[yellow]warning:[/] tracker {name} {what} ({type(exc).__name__}: {exc}); it is switched off, "
        "metrics.jsonl has every row",
        highlight=False,
        soft_wrap=True,
    )


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:500]
