"""The `stableopd` command line: thin Typer commands over the `run_*` stages.

Every command takes `-c CONFIG.yaml` and repeatable `-s key=value` overrides; short flags such as
`--student` are sugar for config keys. Bad input ends with exit code 2 and one line (`--debug` shows
the traceback); a collapse stop ends with exit code 3.

    stableopd --help
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape as rich_escape

from stableopd.config import Config, DiagnoseConfig, load_config
from stableopd.engine.runctl import Stopped
from stableopd.errors import CollapseStop, TrainingStopped, UserError, record_exit_code
from stableopd.progress import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="On-policy distillation that sees length inflation and truncation collapse coming.",
)

ConfigOpt = typer.Option(None, "-c", "--config", help="YAML config file.")
SetOpt = typer.Option(
    [],
    "-s",
    "--set",
    metavar="KEY=VALUE",
    help="Override a config key: -s loss.ref_kl_coef=0.02 (repeatable).",
)
DebugOpt = typer.Option(False, "--debug", metavar="", help="Show tracebacks.")
ResumeOpt = typer.Option(False, "--resume", metavar="", help="Continue from the latest complete checkpoint.")
NprocOpt = typer.Option(1, "--nproc", min=1, help="Processes: re-runs this command under torchrun.")
DryRunOpt = typer.Option(
    False,
    "--dry-run",
    metavar="",
    help="Check the config, models and data without loading weights; print the plan.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import torch

        typer.echo(
            f"stableopd {version('stableopd')} (torch {torch.__version__}, python {sys.version.split()[0]})"
        )
        raise typer.Exit()


@app.callback()
def _main(
    _version_flag: bool = typer.Option(
        False, "--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """On-policy distillation that sees length inflation and truncation collapse coming."""


def _error(message: str) -> None:
    console.print(f"[bold red]error:[/] {rich_escape(message)}", highlight=False, soft_wrap=True)


def _guard(debug: bool, body: Callable[[], int | None]) -> None:
    """Run a command body; turn every failure into one line and an exit code (`--debug` re-raises).

    Exit codes: 2 bad input or environment (a UserError, or an OS error naming a path: no space, permission
    denied), 3 collapse stop, 4 non-finite training, 130/143 interrupted, 1 anything else, which is a bug."""
    try:
        code = body() or 0
    except (UserError, CollapseStop, TrainingStopped) as exc:
        if debug:
            raise
        _error(str(exc))
        code = exc.exit_code
    except Stopped as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped after the same step: one says so
            console.print(str(exc), highlight=False, soft_wrap=True)
        code = exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or runctl.Interrupted for SIGINT/SIGTERM during training
        console.print(str(exc) or "interrupted", highlight=False, soft_wrap=True)
        code = getattr(exc, "exit_code", 130)
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, OSError) and exc.strerror:  # the machine said no: disk full, permission denied
            _error(f"{exc.strerror.lower()}{f': {exc.filename}' if exc.filename else ''}")
            code = 2
        else:  # a bug: one line, and the way to see more
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            _error(
                f"internal error: {type(exc).__name__}{': ' + text if text else ''}; rerun with --debug "
                "for the traceback"
            )
            code = 1
    if code:
        record_exit_code(code)
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "torch.distributed" in sys.modules:
        # A rank of a multi-process run that finished, its process group already destroyed: leave without
        # the interpreter's teardown, where gloo worker threads still holding finished work can abort the
        # process ("terminate called without an active exception", pytorch/pytorch#190489). A failing rank
        # exits as usual, which leaves the others time to print their own error before torchrun stops them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def _relaunch_locked(nproc: int, run_dir: Path) -> int:
    """`--nproc K`: hold the run directory's lock here, for the ranks torchrun starts (runctl.RunLock), and
    tell them the command as typed, for the resume line they print when stopped."""
    import json

    from stableopd.engine.distributed import relaunch, strip_nproc
    from stableopd.engine.runctl import ARGV_ENV, LOCK_ENV, RunLock
    from stableopd.files import check_output_dir

    check_output_dir(run_dir, "run directory")
    with RunLock(run_dir):
        os.environ[LOCK_ENV] = str(run_dir.resolve())
        os.environ[ARGV_ENV] = json.dumps(sys.argv[1:])
        return relaunch(nproc, strip_nproc(sys.argv[1:]))


def _config(path: Path | None, sets: list[str], flags: dict[str, Any]) -> Config:
    return load_config(path, sets, flags)


def _train(cfg: Config, command: str, nproc: int, resume: bool, dry_run: bool, run) -> int:
    """A training command: its plan (--dry-run), K processes under torchrun (--nproc), or `run` here."""
    if dry_run:
        return _plan(cfg, command, nproc, resume)
    if nproc > 1:
        from stableopd.engine.distributed import check_launch

        check_launch(nproc, cfg)
        return _relaunch_locked(nproc, Path(cfg.out or f"runs/{command}"))
    return run(cfg, resume=resume)


def _plan(cfg: Config, command: str, nproc: int, resume: bool) -> int:
    from stableopd.stages.plan import run_plan

    return run_plan(
        cfg,
        command=command,
        world=nproc,
        resume=resume,
        print_line=lambda line: console.print(line, highlight=False, soft_wrap=True, markup=False),
    )


@app.command()
def rollout(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    model: str = typer.Option(None, "--model", help="Model to sample from (sets student.name)."),
    data: str = typer.Option(None, "--data", help="Prompts: file, builtin:arith or dataset name."),
    out: Path = typer.Option(None, "--out", help="Output JSONL (default rollouts.jsonl)."),
    debug: bool = DebugOpt,
) -> None:
    """Sample n responses per prompt and write rollout records as JSONL."""

    def body() -> int:
        from stableopd.stages.rollout import print_rollout_summary, run_rollout

        cfg = _config(config, sets, {"student.name": model, "data.source": data, "out": out and str(out)})
        dest = Path(cfg.out or "rollouts.jsonl")
        print_rollout_summary(run_rollout(cfg, out=dest), dest)
        return 0

    _guard(debug, body)


@app.command()
def distill(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    student: str = typer.Option(None, "--student", help="Student model (sets student.name)."),
    teacher: str = typer.Option(None, "--teacher", help="Teacher model (sets teacher.name)."),
    data: str = typer.Option(None, "--data", help="Training prompts (sets data.source)."),
    out: Path = typer.Option(None, "--out", help="Run directory (sets out)."),
    resume: bool = ResumeOpt,
    nproc: int = NprocOpt,
    dry_run: bool = DryRunOpt,
    debug: bool = DebugOpt,
) -> None:
    """Distill the teacher into the student with OPD or StableOPD."""

    def body() -> int:
        from stableopd.stages.distill import run_distill

        cfg = _config(
            config,
            sets,
            {"student.name": student, "teacher.name": teacher, "data.source": data, "out": out and str(out)},
        )
        return _train(cfg, "distill", nproc, resume, dry_run, run_distill)

    _guard(debug, body)


@app.command()
def sft(
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    student: str = typer.Option(None, "--student", help="Model to fine-tune (sets student.name)."),
    data: str = typer.Option(None, "--data", help="Examples with golden solutions (sets data.source)."),
    out: Path = typer.Option(None, "--out", help="Run directory (sets out)."),
    resume: bool = ResumeOpt,
    nproc: int = NprocOpt,
    dry_run: bool = DryRunOpt,
    debug: bool = DebugOpt,
) -> None:
    """Warm-start the student with supervised fine-tuning on golden solutions."""

    def body() -> int:
        from stableopd.stages.sft import run_sft

        cfg = _config(config, sets, {"student.name": student, "data.source": data, "out": out and str(out)})
        return _train(cfg, "sft", nproc, resume, dry_run, run_sft)

    _guard(debug, body)


@app.command("eval")
def eval_(
    targets: list[str] = typer.Argument(None, help="Models or run directories to evaluate."),
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    model: list[str] = typer.Option([], "--model", help="Model or run directory (repeatable)."),
    data: str = typer.Option(None, "--data", help="Problems with answers (sets data.source)."),
    responses: Path = typer.Option(None, "--responses", help="Score existing generations instead."),
    step: int = typer.Option(None, "--step", help="Checkpoint step of a run directory."),
    out: Path = typer.Option(None, "--out", help="Folder for per-sample JSONL."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the summary as JSON on stdout."),
    debug: bool = DebugOpt,
) -> None:
    """Measure accuracy with real answer checking, on models or on existing responses."""

    def body() -> int:
        from stableopd.stages.evaluate import run_config_base, run_eval

        flags = {"data.source": data, "out": out and str(out)}
        cfg = _config(config, sets, flags)
        base = (
            run_config_base(list(model) + list(targets or []), cfg.eval.preset) if responses is None else None
        )
        if base is not None:  # a run directory: its own settings under the preset and the command line
            cfg = load_config(config, sets, flags, base=base)
        return run_eval(
            cfg,
            models=list(model) + list(targets or []),
            step=step,
            responses=responses,
            out=Path(cfg.out) if cfg.out else None,
            as_json=as_json,
            console=console,
        )

    _guard(debug, body)


def _diagnose_config(
    path: Path, config: Path | None, sets: list[str], text_field: str | None
) -> DiagnoseConfig:
    # a run directory carries its own repetition settings (L, tau): start from them
    run_config = path / "config.yaml"
    base = config if config is not None or not run_config.is_file() else run_config
    return _config(base, sets, {"diagnose.text_field": text_field}).diagnose


@app.command()
def diagnose(
    paths: list[Path] = typer.Argument(
        ...,
        metavar="PATH",
        help="Run directory, metrics.jsonl or JSONL of responses; give two or more to compare them.",
    ),
    config: Path = ConfigOpt,
    sets: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the verdict as JSON on stdout."),
    plots: Path = typer.Option(
        None,
        "--plots",
        help="Folder for PNG plots and report.md (default: "
        "RUN_DIR/report for one run directory, ./diagnose-compare for "
        "several paths).",
    ),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Exit 1 unless every run is healthy."),
    text_field: str = typer.Option(None, "--text-field", help="Field holding the response text."),
    debug: bool = DebugOpt,
) -> None:
    """Say whether and when a run is inflating or collapsing; with several paths, compare them."""

    def body() -> int:
        from stableopd.diagnostics.report import run_diagnose

        cfgs = [_diagnose_config(path, config, sets, text_field) for path in paths]
        kw = {"as_json": as_json, "plots_dir": plots, "strict": strict, "console": console}
        if len(paths) == 1:
            return run_diagnose(paths[0], cfgs[0], **kw)
        from stableopd.diagnostics.compare import run_compare

        return run_compare(list(zip(paths, cfgs)), **kw)

    _guard(debug, body)


@app.command()
def export(
    run: Path = typer.Argument(..., metavar="RUN_DIR", help="A distill or sft run directory."),
    step: int = typer.Option(None, "--step", help="Checkpoint step (default: the latest)."),
    out: Path = typer.Option(None, "--out", help="Folder to write (default: RUN_DIR/export/step_N)."),
    merge: bool = typer.Option(
        False, "--merge", metavar="", help="Fold a LoRA adapter into its base model and write a full model."
    ),
    debug: bool = DebugOpt,
) -> None:
    """Write a run's checkpoint as a Hugging Face model directory (a LoRA run: its adapter, or --merge)."""

    def body() -> int:
        from stableopd.stages.export import run_export

        run_export(run, step=step, out=out, merge=merge, console=console)
        return 0

    _guard(debug, body)


@app.command()
def models() -> None:
    """List the built-in models and aliases."""
    from stableopd.models.loading import describe_models

    for name, what in describe_models().items():
        typer.echo(f"{name:18s} {what}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
