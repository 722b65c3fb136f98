"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

Without torchrun (no WORLD_SIZE) the trainer is one process and every helper here is a no-op, so
``python -m train.train`` works as it is. With CUDA each process drives ``cuda:LOCAL_RANK`` and talks
NCCL; without, it runs on the CPU and talks gloo.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(timeout_s: float = 600.0) -> Dist:
    """This process's place in the run; with several processes, the process group, whose collectives give
    up after ``timeout_s`` (train.dist_timeout_s) waiting for another process."""
    die_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
        if missing:  # without LOCAL_RANK every process would take GPU 0
            raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the processes with "
                             "torchrun (train/run.sh does), or have your launcher set RANK and LOCAL_RANK for each "
                             "process (LOCAL_RANK picks its GPU)")
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                               "start no more processes per node than GPUs (train/run.sh --nproc)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return Dist(rank, world, local, device)


# What gloo, NCCL and c10d say when a peer died, hung past the timeout or cannot be reached. Phrases that
# name a peer are enough; the others (a timeout, a refused connection) count only in an error of the process
# group (a DistError, or text that names the backend), never in, say, an out-of-memory error or an error of
# NCCL itself (an unhandled CUDA error, an invalid usage), which report themselves (exit 1).
_PEER_SIGNS = ("connection reset by peer", "connection closed by peer", "pair closure", "remote process exited",
               "network error")
_WAIT_SIGNS = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out",
               "timeout", "timing out", "no route to host", "unreachable")
_GROUP_SIGNS = ("gloo", "nccl", "c10d", "processgroup", "watchdog")


def lost_contact(e: BaseException, d: Dist) -> Optional[str]:
    """A message for the user when ``e`` is a collective that failed because another process (another node)
    died, hung or became unreachable; None for any other error, or without a process group."""
    if not d.enabled:
        return None
    text = str(e).strip()
    low = text.lower()
    of_group = isinstance(e, dist.DistError) or any(s in low for s in _GROUP_SIGNS)
    lost = (isinstance(e, (dist.DistNetworkError, dist.DistStoreError)) or any(s in low for s in _PEER_SIGNS)
            or (of_group and any(s in low for s in _WAIT_SIGNS)))
    if not lost:
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's source location, "[.../pair.cc:545] "
    first = first.split(". ")[0].rstrip(". ")  # its advice after the first sentence is for developers
    first = "".join(c for c in first if c.isprintable())[:300]
    return (f"rank {d.rank} of {d.world_size} lost contact with the other processes of the run ({first}): another "
            "node or process died, became unreachable or did not answer within train.dist_timeout_s, and this "
            "one stops too. Look at the other nodes' output for the first error; then start the same command "
            "on every node again: the run resumes from RUN/last.pt")


def die_with_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this worker when torchrun dies (the OOM killer, a ``kill -9``
    of the launcher's process group, a crashed agent): torchrun starts each worker in a session of its own, so
    nothing else would end it, and it would go on training beside a rerun of the same command. Linux only."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    from .launch import LAUNCHER_PID_ENV

    # the launcher's pid where train/run.sh started torchrun: a torchrun that died during this worker's
    # start-up is then seen too; else the parent as it is now. Taken out of the environment: it names this
    # worker's parent only, not that of anything the worker starts.
    parent = int(os.environ.pop(LAUNCHER_PID_ENV, "") or os.getppid())
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # torchrun died before the kernel watched it
        os.kill(os.getpid(), signal.SIGKILL)


# ---- stopping on a signal ------------------------------------------------------------------------------
# SIGTERM and SIGUSR1 (docker stop, a scheduler's preemption or time limit, torchrun's shutdown) only note the
# signal here; the trainer asks ``stop_signal`` at step boundaries, and every rank gets the same answer.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_caught = 0


def _note(signum, frame) -> None:
    global _caught
    _caught = signum


def catch_stop_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, _note)


def stop_signal(d: Dist) -> int:
    """The stop signal that any rank of the run has caught, 0 if none: a collective (every rank calls it at
    the same step), answering the same on every rank."""
    if not d.enabled:
        return _caught
    return int(all_reduce(torch.tensor(_caught, device=d.device), d, "max"))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any, d: Dist) -> List[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not d.enabled:
        return [obj]
    out: List[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """In place; ``op`` sum | min | max."""
    if d.enabled:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
