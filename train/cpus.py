"""CPU cores shared out among the training processes of one node (``data.cpu_share``).

On an N-GPU box every rank's DALI threads and torch intra-op threads would otherwise run on every core,
and the ranks' decoders preempt each other and the threads that drive the GPUs. ``partition_cpus`` gives
each local rank its own slice of the cores this process may use (``os.sched_getaffinity``: a container or
``taskset`` restricts it, the core count does not say so), after ``data.cpu_reserve`` cores are kept for
what every rank shares (the launcher, NCCL's threads, the kernel's work for the GPUs). Where
``/sys/devices/system/node`` lists NUMA nodes and the ranks divide evenly among them, a rank's slice lies
within one node (ranks 0.. on node 0 first, as GPUs usually are). ``apply_cpu_share`` pins the calling thread,
so every thread started after it (DALI's workers, torch's OpenMP team) inherits the slice; threads started
before keep their mask (NCCL's, which ``train.distributed.setup`` starts, may use the reserve).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Set

from dali_pipes.config import CPU_SHARE_MODES

NODE_DIR = "/sys/devices/system/node"


def parse_cpulist(text: str) -> Set[int]:
    """The cores of a kernel cpu list such as ``0-3,8,10-11``."""
    cores: Set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def numa_nodes(node_dir: str = NODE_DIR) -> Dict[int, Set[int]]:
    """``{node: cores}`` as the kernel lists them; empty where it does not (no such directory)."""
    nodes = {}
    for path in glob.glob(os.path.join(node_dir, "node*", "cpulist")):
        m = re.fullmatch(r"node(\d+)", os.path.basename(os.path.dirname(path)))
        if m:
            with open(path) as f:
                nodes[int(m.group(1))] = parse_cpulist(f.read())
    return nodes


def partition_cpus(allowed: Iterable[int], local_rank: int, local_world: int, reserve: int,
                   nodes: Optional[Dict[int, Set[int]]] = None) -> Optional[List[int]]:
    """The sorted cores of ``local_rank`` (of ``local_world`` processes on this node), or None where the
    ``allowed`` cores less the ``reserve`` lowest-numbered ones leave fewer than one per process. The slices
    of the ranks are disjoint and together cover the cores after the reserve; their sizes differ by at most
    one, except where the slices follow the NUMA ``nodes`` (each rank within one node), which they do when
    the ranks divide evenly among the nodes that hold allowed cores and each such rank gets a core."""
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"cpu share: local rank {local_rank} is not in 0..{local_world - 1}")
    if reserve < 0:
        raise ValueError(f"data.cpu_reserve must be >= 0, not {reserve}")
    rest = sorted(allowed)[reserve:]
    if len(rest) < local_world:
        return None
    by_node = [sorted(set(rest) & cores) for _, cores in sorted((nodes or {}).items())]
    by_node = [cores for cores in by_node if cores]
    if by_node and sum(map(len, by_node)) == len(rest) and local_world % len(by_node) == 0:
        per_node = local_world // len(by_node)
        if all(len(cores) >= per_node for cores in by_node):
            rest, local_rank, local_world = by_node[local_rank // per_node], local_rank % per_node, per_node
    return rest[len(rest) * local_rank // local_world: len(rest) * (local_rank + 1) // local_world]


def apply_cpu_share(mode: str, reserve: int, local_rank: int, local_world: int, torch_threads: bool = True,
                    note: Optional[Callable[[str], None]] = None, node_dir: str = NODE_DIR) -> Optional[List[int]]:
    """Pin this thread (and what it starts from now on) to this rank's ``partition_cpus`` slice, and set
    torch's intra-op threads to the slice's size (unless ``torch_threads`` is False: ``train.num_threads``
    says how many). ``mode``: ``auto`` partitions only with several processes on the node, ``on`` with one
    too, ``off`` never. Returns the slice, or None where nothing was pinned; ``note`` hears why (too few
    cores) or which cores this rank got."""
    if mode not in CPU_SHARE_MODES:
        raise ValueError(f"data.cpu_share must be one of {', '.join(CPU_SHARE_MODES)}, not {mode!r}")
    if mode == "off" or (mode == "auto" and local_world < 2) or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    share = partition_cpus(allowed, local_rank, local_world, reserve, numa_nodes(node_dir))
    say = note or (lambda msg: None)
    if share is None:
        say(f"data.cpu_share: {len(allowed)} usable cores less data.cpu_reserve={reserve} leave fewer than one "
            f"per process ({local_world} on this node): cores not partitioned, every process uses all of them")
        return None
    os.sched_setaffinity(0, share)
    if torch_threads:
        import torch

        torch.set_num_threads(len(share))
    say(f"data.cpu_share: local rank {local_rank} of {local_world} decodes and computes on cores "
        f"{_cpulist(share)} ({len(share)} of {len(allowed)}; {reserve} kept for all)")
    return share


def _cpulist(cores: List[int]) -> str:
    """``cores`` written as the kernel writes a cpu list (``0-3,8``)."""
    runs: List[List[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
