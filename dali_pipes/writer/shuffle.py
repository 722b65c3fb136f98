"""The repack's seeded external shuffle: the train shards' records in a random order across all shards.

Catalogue exports often come sorted by category (or by seller, nearly the same thing). The loader reads its
shards in sequence through a shuffle buffer of a few thousand images, so from a sorted file a batch would hold
one or two classes. After the chunks are written (each chunk's shard in file order, as before), every train
group (``train`` and ``products/kK/train``) is reordered in two sequential passes:

1. scatter: each chunk shard is read front to back, and each record, preceded by its random sort key, is
   appended to one of B piece files (B = the group's shard count), the bucket and key drawn from a generator
   seeded by ``(seed, chunk)``; the chunk's shard is then removed. At most ``FILES_PER_PASS`` pieces are open
   at once: with more buckets (a small ``--shard-size-mb`` on a large file) the chunk is read once per
   ``FILES_PER_PASS`` buckets, so the process never nears the usual limit of 1,024 open files;
2. gather: each output shard ``b`` reads its B pieces, orders their records by the keys the pieces carry and
   is written with its index (atomically, index first). Each key is drawn once, in the scatter: the work
   grows with the records, not with records x shards.

The keys depend on the seed, the chunk number and the record's place in its chunk only, and the chunks depend
only on the input and ``--shard-size-mb``: the output stays byte-identical for any ``--workers``. Every read
and write is sequential (at most ``FILES_PER_PASS`` + 1 files open per process); the extra cost is one more read and write of
the train split, and one output shard in memory per process during the gather. Validation and test splits
keep the file order (evaluation reads them in order). Records keep their own ``product_id`` and
``image_index``: whatever is keyed to an image uses those, never a record's position.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..fileio import atomic_open, temp_path_for
from ..records import read_index
from .shards import _index_text

_FRAME = struct.Struct("<Q")  # a record's payload length, the first 8 of its 16 bytes of framing
_KEY = struct.Struct("<q")  # a record's sort key, before it in a piece
FILES_PER_PASS = 512  # pieces open at once in one scatter pass
PIECE_BUFFER = 1 << 16  # write buffer of each open piece (at most FILES_PER_PASS x this: 32 MB)


def is_train_group(group: str) -> bool:
    """Whether a shard group (``train``, ``val``, ``products/k2/train``, ...) is read shuffled in training."""
    return group.rsplit("/", 1)[-1] == "train"


def _keys(seed: int, chunk: int, n: int, buckets: int) -> Tuple[np.ndarray, np.ndarray]:
    """(bucket, sort key) of each of a chunk's ``n`` records."""
    keys = np.random.default_rng([seed, chunk]).integers(0, 1 << 62, size=n, dtype=np.int64)
    return keys % buckets, keys


def _scatter(args) -> List[str]:
    """Pass 1 for one chunk shard: each record, after its sort key, appended to its bucket's piece (at most
    ``FILES_PER_PASS`` pieces open: one read of the shard per that many buckets); then the shard is removed.
    Returns the pieces' paths, one per bucket."""
    out, group, split, info, chunk, buckets, seed = args
    path, idx = os.path.join(out, info["path"]), os.path.join(out, info["index"])
    sizes = [s for _, s in read_index(idx)]
    bucket, keys = _keys(seed, chunk, len(sizes), buckets)
    pieces = [temp_path_for(os.path.join(out, group, f"{split}-{b:05d}.tfrecord")) for b in range(buckets)]
    with open(path, "rb") as f:  # one chunk's shard: the size of the chunk the worker held anyway
        data = memoryview(f.read())
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    for first in range(0, buckets, FILES_PER_PASS):
        handles = {b: open(pieces[b], "wb", buffering=PIECE_BUFFER)
                   for b in range(first, min(first + FILES_PER_PASS, buckets))}
        try:
            for i, (b, k) in enumerate(zip(bucket.tolist(), keys.tolist())):
                h = handles.get(b)
                if h is not None:
                    h.write(_KEY.pack(k))
                    h.write(data[starts[i]:starts[i + 1]])
        finally:
            for h in handles.values():
                h.close()
    os.remove(path)
    os.remove(idx)
    return pieces


def _keyed_frames(data: bytes) -> Tuple[List[int], List[memoryview]]:
    """The sort keys and the records (whole frames) of a piece, in order."""
    keys, out, pos, view = [], [], 0, memoryview(data)
    while pos < len(data):
        keys.append(_KEY.unpack_from(data, pos)[0])
        start = pos + _KEY.size
        end = start + 16 + _FRAME.unpack_from(data, start)[0]
        out.append(view[start:end])
        pos = end
    return keys, out


def _gather(args) -> dict:
    """Pass 2 for one output shard: its pieces' records in key order, written with their index."""
    out, group, split, bucket, pieces = args
    records: List[memoryview] = []
    keys: List[int] = []
    for piece in pieces:
        with open(piece, "rb") as f:
            data = f.read()
        k, frames = _keyed_frames(data)
        records += frames
        keys += k
    order = np.argsort(np.asarray(keys, np.int64), kind="stable")
    name = os.path.join(group, f"{split}-{bucket:05d}")
    sizes = [len(records[i]) for i in order]
    if sizes:
        with atomic_open(os.path.join(out, name + ".idx"), "w") as f:  # the index first, as ShardWriter does
            f.write(_index_text(sizes))
        with atomic_open(os.path.join(out, name + ".tfrecord"), "wb") as f:
            for i in order:
                f.write(records[i])
    for piece in pieces:
        os.remove(piece)
    return {"records": len(sizes), "bytes": sum(sizes), "path": name + ".tfrecord", "index": name + ".idx"}


def _map(fn, tasks: Sequence, workers: int, init) -> list:
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with mp.get_context("fork").Pool(min(workers, len(tasks)), initializer=init) as pool:
        return pool.map(fn, tasks, chunksize=1)


def shuffle_group(out: str, group: str, infos: List[dict], seed: int, workers: int = 1,
                  init: Optional[Callable[[], None]] = None) -> List[dict]:
    """Reorder the records of one shard group of ``out`` (its chunk shards ``infos``, in chunk order) into
    as many shards in a seeded random order; returns the new shards' manifest entries. ``init``: run in each
    pool process first (the repack's signal settings)."""
    if not infos:
        return infos
    split = group.rsplit("/", 1)[-1]
    buckets = len(infos)
    pieces = _map(_scatter, [(out, group, split, info, c, buckets, seed) for c, info in enumerate(infos)], workers, init)
    done = _map(_gather, [(out, group, split, b, [p[b] for p in pieces]) for b in range(buckets)], workers, init)
    return [d for d in done if d["records"]]


def shuffle_train_groups(out: str, shards: Dict[str, List[dict]], seed: int, workers: int = 1,
                         init: Optional[Callable[[], None]] = None) -> None:
    """``shuffle_group`` for every train group of a repack's ``shards`` (group -> entries), in place."""
    for group in sorted(shards):
        if is_train_group(group):
            shards[group] = shuffle_group(out, group, shards[group], seed, workers, init)
