"""Errors that end a command with exit code 2 and one line telling the user what to fix.

Anything raised as `UserError` is printed by the CLI as `error: <message>` with no traceback
(unless `--debug`). Components raise it for bad input they can name: a missing file, an unknown
model, an incompatible tokenizer, a malformed data line.
"""

from __future__ import annotations

import os

EXIT_DIR_ENV = "STABLEOPD_EXIT_DIR"  # set by distributed.relaunch for the ranks of `--nproc K`


class UserError(Exception):
    """Bad input the user can fix; the message says what is wrong and what to do."""

    exit_code = 2


class CollapseStop(Exception):
    """The collapse guard stopped a run (`train.stop_on_collapse`); exit code 3."""

    exit_code = 3


class TrainingStopped(Exception):
    """Too many consecutive non-finite steps; the last good checkpoint is kept. Exit code 4."""

    exit_code = 4


def record_exit_code(code: int) -> None:
    """Under `distill --nproc K`, leave this rank's exit code for the launcher, which returns it instead of
    torchrun's 1 (distributed.relaunch); a no-op otherwise."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), "w") as fh:
            fh.write(str(code))
