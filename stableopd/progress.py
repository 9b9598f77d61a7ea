"""Rich progress bars and the shared console (stderr, so `--json` output on stdout stays clean)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(label: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)`; draws a bar on stderr when enabled."""
    if not enabled:
        yield lambda k=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as prog:
        task = prog.add_task(label, total=total)
        yield lambda k=1: prog.advance(task, k)


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


@contextmanager
def step_display(total: int, start: int, *, enabled: bool = True) -> Iterator[Callable]:
    """A progress bar over training steps, plus one compact line per step (loss, length, trunc, rep, time).

    Yields `show(step, metrics, verdict)`. The guard's verdict is shown in the bar and, when it changes
    from healthy, as a warning line.
    """
    state = {"verdict": "healthy"}

    def line(step: int, m: dict, verdict) -> str:
        t = m.get("time/step_s") or sum(
            m.get(k, 0.0) or 0.0 for k in ("time/rollout_s", "time/teacher_s", "time/train_s")
        )
        val = f" val_acc {_fmt(m.get('val/accuracy'))}" if "val/accuracy" in m else ""
        return (
            f"step {step:>5} loss {_fmt(m.get('loss/total'), '+.4f')} len {_fmt(m.get('rollout/length_mean'), '.1f')}"
            f" trunc {_fmt(m.get('rollout/trunc_rate'), '.2f')} rep {_fmt(m.get('rollout/rep_rate'), '.2f')}"
            f" adv {_fmt(m.get('adv/mean'), '+.3f')} gnorm {_fmt(m.get('optim/grad_norm'), '.3g')}{val}"
            f" [{t:.1f}s: roll {_fmt(m.get('time/rollout_s'), '.1f')} teach {_fmt(m.get('time/teacher_s'), '.1f')}"
            f" train {_fmt(m.get('time/train_s'), '.1f')}]"
        )

    def warn(step: int, verdict) -> None:
        if verdict.verdict != state["verdict"]:
            state["verdict"] = verdict.verdict
            if verdict.verdict != "healthy":
                console.print(
                    f"[bold yellow]warning:[/] step {step}: {verdict.verdict} detected "
                    f"(onset step {verdict.onset_step}): {'; '.join(verdict.reasons)}",
                    highlight=False,
                )

    if not enabled:

        def show(step, m, verdict):
            warn(step, verdict)

        yield show
        return
    with Progress(
        TextColumn("[bold]distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    ) as prog:
        task = prog.add_task("distill", total=total, completed=start, status="")

        def show(step, m, verdict):
            prog.console.print(
                line(step, m, verdict), highlight=False, soft_wrap=True
            )  # one line in a log file
            warn(step, verdict)
            status = (
                f"loss {_fmt(m.get('loss/total'), '+.3f')} len {_fmt(m.get('rollout/length_mean'), '.0f')} "
                f"trunc {_fmt(m.get('rollout/trunc_rate'), '.2f')} rep {_fmt(m.get('rollout/rep_rate'), '.2f')} "
                f"{verdict.verdict}"
            )
            prog.update(task, completed=step, status=status)

        yield show


def note(message: str, *, enabled: bool = True) -> None:
    """One plain status line on stderr (model loading, validation): never a spinner, so logs keep it."""
    if enabled:
        console.print(message, highlight=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """72.4 -> '1 min 12 s'; 5.25 -> '5.2 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def run_summary(rows: list[dict], *, first_step: int, wall_s: float, checkpoints: list[str]) -> list[str]:
    """The end-of-run lines: steps and time, validation accuracy from start to end and its best step (with its
    checkpoint when one was kept), and the last step's rollouts and guard verdict. `checkpoints` are the
    kept checkpoint directory names (step_NNNNNN)."""
    done = [r for r in rows if r.get("step", 0) >= first_step and r.get("step", 0) > 0]
    if not done:
        return []
    last = done[-1]
    ran = len(done)
    out = [
        f"finished step {last['step']}: {ran} step{'s' * (ran != 1)} in {duration(wall_s)} "
        f"({wall_s / ran:.2f} s a step)"
    ]
    val = [(r["step"], r["val/accuracy"]) for r in rows if isinstance(r.get("val/accuracy"), (int, float))]
    if val:
        best_step, best = max(val, key=lambda sv: (sv[1], -sv[0]))  # the earliest step among ties
        kept = f"step_{best_step:06d}"
        where = f" (checkpoints/{kept})" if kept in checkpoints else " (no checkpoint kept at that step)"
        out.append(
            f"val_acc {val[0][1]:.3g} at step {val[0][0]} -> {val[-1][1]:.3g} at step {val[-1][0]}; "
            f"best {best:.3g} at step {best_step}{where if best_step > 0 else ''}"
        )
    if "rollout/trunc_rate" in last:
        out.append(
            f"last step's rollouts: length {_fmt(last.get('rollout/length_mean'), '.1f')}, truncated "
            f"{_fmt(last.get('rollout/trunc_rate'), '.2f')}, repetitive {_fmt(last.get('rollout/rep_rate'), '.2f')}; "
            f"guard: {last.get('guard/verdict', '-')}"
        )
    return out
