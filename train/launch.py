"""What ``train/run.sh`` runs in front of torchrun, in one process before any worker starts:

    python -m train.launch RECIPE [--data DATA] [--out RUN] [section.key=value ...] [--no-lock] -- TORCHRUN_ARGS

1. the recipe, the overrides and the data directory are checked (``train.config.resolve_run``): a mistake is
   one ``error:`` line and exit status 2;
2. ``RUN/.lock`` is taken (``hold_run_lock``): while a live run holds it, the start is refused in one line,
   exit status 2, naming the host and pid that hold it, before anything in RUN is touched;
3. torchrun (``train.torchrun``) replaces this process (exec) and keeps the lock's file descriptor: the lock
   lives as long as torchrun and dies with it (an OS lock: a killed run leaves no lock behind, only the file).
   torchrun's workers do not inherit it (Python closes inherited descriptors in the children it starts).

``--no-lock``: the nodes of a multi-node run other than the one that hosts rank 0 (with c10d rendezvous no
node knows that before it starts: the trainer's rank 0 takes the lock then, ``Trainer._prepare_run_dir``).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import os
import socket
import sys
import time
from typing import Optional

from .config import ConfigError, add_run_args, resolve_run

LOCK = ".lock"
# Set for the trainer when its launcher holds RUN/.lock: the path of the lock held.
LOCK_ENV = "TRAIN_RUN_LOCK"
# The launcher's pid, which torchrun keeps (exec): a worker compares its parent with it once it has asked to
# die with that parent, so a torchrun that died while the worker was still starting is seen too.
LAUNCHER_PID_ENV = "TRAIN_LAUNCHER_PID"
# The trainer's exit statuses (README, "Exit status"), and the file in which, under run.sh, its processes leave
# the run's status for run.sh to return (torchrun turns every failure into 1).
EXIT_NONFINITE, EXIT_USAGE, EXIT_EARLY_STOP, EXIT_LOST_CONTACT, EXIT_STOPPED = 1, 2, 3, 4, 5
EXIT_ERROR = 1  # any other error (its traceback says which)
STATUS_ENV = "TRAIN_STATUS_FILE"
# Signals torchrun passes on to its workers (torch versions with --signals-to-handle): SIGUSR1 is how SLURM
# warns of the end of a job (sbatch --signal), the trainer checkpoints on it as on SIGTERM.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class RunInUse(ConfigError):
    """RUN is held by a live run."""


def hold_run_lock(run_dir: str, note=print) -> Optional[int]:
    """Take ``RUN/.lock`` (creating RUN) and write this host and pid into it; the descriptor that holds the
    lock, None where this process's launcher holds it already (``LOCK_ENV``) or where the file system has no
    locks (``note`` says so). Raises RunInUse, naming the holder, while another process holds it; then
    nothing in RUN has changed."""
    path = os.path.abspath(os.path.join(run_dir, LOCK))
    if os.environ.get(LOCK_ENV) == path:
        return None
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "a process that has not said who it is"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunInUse(f"{run_dir} is in use by a live run: {holder} holds {path}. Wait for it to end, stop it "
                           "(SIGTERM to its train/run.sh: it writes RUN/last.pt and exits 5), or start this run "
                           "with another --out") from None
        note(f"{path}: the file system refuses locks ({e.strerror}): nothing keeps a second run off {run_dir}")
        return None
    # In place, not an atomic replace: the lock belongs to this file (inode); a new file would be unlocked.
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n"
             .encode())
    return fd


def _torchrun_has(flag: str) -> bool:
    """Whether the installed torchrun takes ``flag``, read from its source (importing torch costs seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        with open(os.path.join(spec.submodule_search_locations[0], "distributed", "run.py")) as f:
            return flag in f.read()
    except OSError:
        return False


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m train.launch RECIPE [--data DATA] [--out RUN] [overrides] [--no-lock] -- "
              "TORCHRUN_ARGS", file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m train.launch")
    add_run_args(p)
    p.add_argument("--no-lock", action="store_true", help="another node takes RUN/.lock")
    a = p.parse_intermixed_args(argv[:cut])
    try:
        _, run_dir = resolve_run(a.recipe, a.data, a.overrides, a.out)
        fd = None if a.no_lock else hold_run_lock(run_dir, note=lambda m: print(f"note: {m}", flush=True))
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if fd is not None:
        os.set_inheritable(fd, True)
        os.environ[LOCK_ENV] = os.path.abspath(os.path.join(run_dir, LOCK))
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    cmd = [sys.executable, "-m", "train.torchrun"]
    if _torchrun_has("--signals-to-handle"):
        cmd.append(f"--signals-to-handle={TORCHRUN_SIGNALS}")
    os.execv(sys.executable, cmd + argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
