"""The run-directory lock and the signal handling of training commands, in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from stableopd.engine import runctl
from stableopd.engine.runctl import GracefulStop, Interrupted, RunLock
from stableopd.errors import UserError


def test_a_second_lock_on_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError) as exc:
            RunLock(run).acquire()
        assert str(exc.value) == (
            f"run directory '{run}' is in use by another stableopd process (pid {os.getpid()}); "
            "wait for it to end, or pass another --out"
        )
    RunLock(run).acquire().release()  # released on exit


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from stableopd.engine.runctl import RunLock; "
            f"lock = RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        RunLock(run).acquire()
    holder.kill()
    holder.wait()
    RunLock(run).acquire().release()


def test_a_lock_held_by_the_launcher_is_inherited(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with RunLock(run):
        monkeypatch.setenv(runctl.LOCK_ENV, str(run.resolve()))
        RunLock(run).acquire()  # a rank started by the launcher that holds it


def test_a_directory_created_only_for_the_lock_is_removed_again(tmp_path):
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    RunLock(fresh).acquire().release()
    assert not fresh.exists()
    lock = RunLock(used).acquire()
    (used / "metrics.jsonl").write_text("")
    lock.release()
    assert sorted(p.name for p in used.iterdir()) == [".lock", "metrics.jsonl"]


def test_before_arming_a_signal_stops_at_once_with_its_exit_code():
    with GracefulStop() as stop, pytest.raises(Interrupted) as exc:
        os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.exit_code == 143 and str(exc.value) == "interrupted by SIGTERM before training started"
    assert stop.signum is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_once_armed_the_first_signal_is_a_request_and_the_second_stops(monkeypatch, sig):
    before = signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    try:
        announced = []
        with GracefulStop(announce=announced.append) as stop:
            stop.arm()
            os.kill(os.getpid(), sig)
            assert stop.signum == sig
            name = signal.Signals(sig).name
            assert announced == [
                f"{name}: finishing this step and saving a checkpoint (send it again to stop at once)"
            ]
            os.kill(os.getpid(), sig)  # the same Ctrl-C delivered twice (terminal and torchrun): ignored
            monkeypatch.setattr(runctl, "REPEAT_S", 0.0)
            with pytest.raises(Interrupted) as exc:
                os.kill(os.getpid(), sig)
        assert (
            exc.value.exit_code == 128 + sig
            and "continue from the last checkpoint with: stableopd" in str(exc.value)
        )
        assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    finally:
        signal.signal(sig, before)


def test_an_ignored_sigint_stays_ignored():
    """A run started with SIGINT ignored (nohup, `cmd &` in a script) is not stopped by Ctrl-C."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            stop.arm()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
