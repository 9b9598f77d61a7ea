"""One writer per run directory, and clean stops on SIGINT / SIGTERM.

`RunLock` holds an exclusive `flock` on RUN_DIR/.lock for the life of a `distill` or `sft`: a second command
on the same directory is refused at once with the holder's pid. The kernel drops the lock when its process
dies, however it dies, so a killed run never leaves the directory stuck. Under `distill --nproc K` the
launcher holds the lock and the ranks it starts inherit it.

`GracefulStop` turns the first SIGINT (Ctrl-C) or SIGTERM during training into a request: the training loop
finishes the step in flight, saves a checkpoint of it and raises `Stopped`, which exits 130 (SIGINT) or 143
(SIGTERM) with the command that resumes. A second signal, or one during set-up (loading the models), stops
at once (`Interrupted`); `--resume` then continues from the last checkpoint saved before.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from stableopd.errors import UserError

LOCK_NAME = ".lock"
REPEAT_S = 2.0  # a second signal this soon after the first is the same request, delivered twice
LOCK_ENV = "STABLEOPD_RUN_LOCK"  # set by the --nproc launcher: the run directory whose lock it holds
ARGV_ENV = "STABLEOPD_ARGV"  # set by the --nproc launcher: the command line as typed (JSON list)


class RunLock:
    """An exclusive, non-blocking lock on `run_dir` (created if missing)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fh = None
        self._created = False

    def acquire(self) -> RunLock:
        if os.environ.get(LOCK_ENV) == str(self.run_dir.resolve()):
            return self  # the launcher that started this rank holds it
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one writer is the user's to ensure
            return self
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.run_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise UserError(
                f"run directory '{self.run_dir}' is in use by another stableopd process (pid "
                f"{holder}); wait for it to end, or pass another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        lock = self.run_dir / LOCK_NAME
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            lock.unlink()  # a run that failed before writing anything leaves no directory behind
            self.run_dir.rmdir()
        self._fh.close()  # closing the descriptor drops the flock
        self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved. Resume with: {resume_command()}"
        )


def resume_command() -> str:
    """The command that was run (as typed, under --nproc too), with --resume."""
    typed = json.loads(os.environ[ARGV_ENV]) if os.environ.get(ARGV_ENV) else sys.argv[1:]
    args = [a for a in typed if a != "--resume"]
    return " ".join(["stableopd", *map(shlex.quote, args), "--resume"])


class Interrupted(KeyboardInterrupt):
    """A signal that stops the command at once; exit code 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(message)


class GracefulStop:
    """SIGINT/SIGTERM handling for a training command. Until `arm()` (set-up: loading the models) a signal
    stops at once. Once armed, the first signal sets `signum` (and prints a line) for
    the loop to act on after its step; a second one stops at once. Outside the main thread (tests calling
    the trainer) it installs nothing."""

    def __init__(self, *, announce=None) -> None:
        self.signum: int | None = None
        self.armed = False
        self._announce = announce
        self._previous: dict[int, object] = {}
        self._first = 0.0

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum, f"interrupted by {name} before training started")
        if self.signum is not None:
            if (
                now - self._first < REPEAT_S
            ):  # one Ctrl-C reaches a rank twice under torchrun (terminal, relay)
                return
            raise Interrupted(
                signum, f"interrupted by {name}; continue from the last checkpoint with: {resume_command()}"
            )
        self.signum, self._first = signum, now
        if self._announce is not None:
            self._announce(
                f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                "(send it again to stop at once)"
            )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup, `cmd &` in a script: stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
