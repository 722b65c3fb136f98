"""torchrun as ``train/run.sh`` starts it (``train.launch`` execs ``python -m train.torchrun TORCHRUN_ARGS``):
torch's own launcher, with one difference. Where the run ended because its workers refused it or lost
contact (status 2 or 4 in the status file, ``launch.STATUS_ENV``), each has already said why in its own
``error:`` line, and torchrun's failure report (its traceback and a table per worker) would bury that line:
it is left out and run.sh returns the status. Any other failure keeps torch's report."""
from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from .launch import EXIT_LOST_CONTACT, EXIT_USAGE, STATUS_ENV

SAID = (EXIT_USAGE, EXIT_LOST_CONTACT)  # the statuses that come with the workers' own error lines


def worker_status() -> int | None:
    """The status the run's processes left (None: none, or not under run.sh)."""
    try:
        with open(os.environ[STATUS_ENV]) as f:
            return int(f.read().strip())
    except (KeyError, OSError, ValueError):
        return None


def main(argv=None) -> int:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError:
        if worker_status() not in SAID:
            raise
        return 1  # what torchrun returns for any failure; run.sh returns the status file's
    return 0


if __name__ == "__main__":
    sys.exit(main())
