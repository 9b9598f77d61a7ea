"""torchrun for `distill --nproc K`, without torchrun's own tracebacks.

torch.distributed.run ends in a traceback of its own whenever a rank exits non-zero (ChildFailedError) or
the launcher gets SIGINT/SIGTERM (SignalException), on top of the ranks' one-line errors. This entry point
runs the same launcher and turns those two into a plain exit code, and quiets the launcher's per-rank log
lines: the ranks have already said what went wrong, and `distributed.relaunch` returns the failing rank's
own exit code.

    python -m stableopd.engine.launch --standalone --nproc_per_node=2 -m stableopd distill ...
"""

from __future__ import annotations

import logging
import os
import sys

# torch's elastic loggers: some read their level from LOGLEVEL when created (so it is set before importing
# them), the others inherit it from "torch.distributed.elastic" (set in main). Their per-rank status lines
# ("Sending process ... closing signal", "failed (exitcode: 2)") repeat what the ranks print themselves; a
# failure of the launcher itself still raises and shows.
os.environ.setdefault("LOGLEVEL", "CRITICAL")

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(os.environ["LOGLEVEL"])
    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
    except ChildFailedError:
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
