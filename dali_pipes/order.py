"""The train loader's per-epoch order (``data.shuffle=epoch``): every epoch visits the records in a new order.

DALI's TFRecord reader reads the records its index files list, in the order they list them (an index need
not be sorted, and one shard may appear several times with different indexes). So each epoch the loader
writes index files of its own and hands them to a fresh reader:

* every shard's records are permuted, and each permuted shard is cut into slices (at least
  ``MIN_SLICES_PER_RANK`` x world size slices in all);
* the slices are put in a random order; that sequence of records is the epoch's order for all ranks, and
  rank ``r`` reads its part ``shard_range(N, r, W)`` of it (the same cut as DALI's shards, so every rank
  still has the same number of steps);
* the reader's shuffle buffer (``data.initial_fill``) mixes on top, as before.

The order is drawn from ``(data.seed, epoch)`` alone, identical on every rank and again on resume (the reader
checkpoint then positions the reader inside it). What batches hold depends on what each slice holds: the
repack writes the train records in a seeded random order across shards (``dali_pipes.writer.shuffle``), so
any slice is a random sample of the split. Records are read at their offsets in a random order: random
reads of ~5 kB, cheap from memory or an SSD; ``data.shuffle=buffer`` keeps sequential reads for a disk that
seeks slowly (BENCHMARKS.md "Order").
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MIN_SLICES_PER_RANK = 256  # slices in the epoch's order per rank: the rank correlation of two epochs' orders is about 1/sqrt(that)


def epoch_parts(counts: Sequence[int], seed: int, epoch: int, rank: int, world_size: int) -> List[Tuple[int, np.ndarray]]:
    """Rank ``rank``'s records of epoch ``epoch`` in reading order, as (shard number, record numbers in that
    shard) runs: together they are ``shard_range(sum(counts), rank, world_size)`` of the epoch's order."""
    rng = np.random.default_rng([seed, epoch])
    per_shard = -(-MIN_SLICES_PER_RANK * world_size // max(1, len(counts)))
    slices: List[Tuple[int, np.ndarray]] = []
    for s, n in enumerate(counts):
        slices += [(s, part) for part in np.array_split(rng.permutation(n), min(per_shard, max(1, n))) if len(part)]
    total = sum(counts)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    parts, at = [], 0
    for i in rng.permutation(len(slices)).tolist():
        s, part = slices[i]
        a, b = max(lo - at, 0), min(hi - at, len(part))
        if a < b:
            parts.append((s, part[a:b]))
        at += len(part)
        if at >= hi:
            break
    return parts


SHM = "/dev/shm"


def scratch_root(records: int) -> Optional[str]:
    """Where an epoch's index files go: the memory file system where it has room for them four times over
    (ranks write theirs at the same time; Docker's default ``/dev/shm`` is 64 MB), else the default temporary
    folder (None). Creating a file there can cost 40x more CPU: 0.65 ms a file on this project's test VM,
    0.17 s of the 0.3 s an epoch's reader took to start (BENCHMARKS.md)."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    need = records * 24 + 4096 * MIN_SLICES_PER_RANK  # "offset size\n" per record, a block per file
    return SHM if st.f_bavail * st.f_frsize > 4 * need and os.access(SHM, os.W_OK) else None


def write_epoch_index(folder: str, paths: Sequence[str], index_paths: Sequence[str],
                      parts: List[Tuple[int, np.ndarray]]) -> Tuple[List[str], List[str]]:
    """Index files in ``folder`` listing ``parts``' records (``epoch_parts``) in order; returns the reader's
    (paths, index_paths). They are scratch files of this process, made again from the seed whenever needed
    (no atomic write: nothing is lost if one is torn)."""
    tables: Dict[int, np.ndarray] = {}
    out_paths, out_idx = [], []
    for j, (s, records) in enumerate(parts):
        if s not in tables:
            tables[s] = np.loadtxt(index_paths[s], dtype=np.int64, ndmin=2)
        rows = tables[s][records]
        name = os.path.join(folder, f"{j:06d}.idx")
        with open(name, "w") as f:
            f.write(("%d %d\n" * len(rows)) % tuple(rows.ravel().tolist()))
        out_paths.append(paths[s])
        out_idx.append(name)
    return out_paths, out_idx
