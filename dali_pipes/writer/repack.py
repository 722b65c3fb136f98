"""Repack a Cdiscount BSON dump into indexed TFRecord shards (the record format of ``dali_pipes.records``).

Work is split by byte ranges of the BSON (one chunk ~ one shard), so the shards written depend only on the
input and ``--shard-size-mb``, never on the number of workers. Every product read ends up either in the
shards or in ``quarantine.csv``; the manifest, written last and atomically, holds the counts.
"""
from __future__ import annotations

import bisect
import contextlib
import csv
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import bson
import numpy as np

from ..fileio import Progress, atomic_csv, atomic_open, atomic_write_text, csv_text, temp_target
from ..ocr_files import remove_ocr_files
from ..records import (CLASSES_FILE, FORMAT_VERSION, HASHES_FILE, IMAGE_FEATURES, MANIFEST, MAX_K, PRODUCTS_FILE,
                       OCR_DIR, QUARANTINE_FILE, REPACK_MARKER, SPLIT_DIRS, product_features)
from .bson_io import MAX_DOC_BYTES, BsonFileError, OffsetIndex, scan_offsets
from .exclude import ExcludeError, read_exclude
from .jpeg_check import DEFAULT_MAX_SIDE, DEFAULT_VERIFY, VERIFY_MODES, make_check
from .shards import ShardWriter, int_feature
from .shuffle import shuffle_train_groups

MAX_IMAGE_BYTES = 4 << 20  # the competition's images are ~5 kB; megabytes mean something is wrong
QUARANTINE_FIELDS = ["product_id", "offset", "image_index", "reason"]
# Duplicate lookup (tools.predict --dedup, HASHES_FILE): a 64-bit hash (blake2b) of every written image with
# its product and category id (-1 in unlabelled repacks), sorted by hash.
HASH_DTYPE = np.dtype([("hash", "<u8"), ("product_id", "<i8"), ("category_id", "<i8")])
ORDERS = ("shuffle", "file")  # --order: the train records shuffled across shards (seeded), or in the BSON's order
_FILES = (MANIFEST, CLASSES_FILE, QUARANTINE_FILE, PRODUCTS_FILE, HASHES_FILE)  # beside SPLIT_DIRS
_SHARD_FILE = re.compile(r"(train|val|test)-\d{5}\.(tfrecord|idx)")  # what _ChunkWriters names a shard


def image_hash(picture: bytes) -> bytes:
    """The 8-byte digest of an image's bytes (little-endian uint64 in ``HASHES_FILE``)."""
    return hashlib.blake2b(picture, digest_size=8).digest()


class RepackError(RuntimeError):
    """An input problem the user must fix; the message says what and how."""


def val_flags(ids: np.ndarray, fraction: float) -> np.ndarray:
    """Deterministic per-product split: splitmix64 of each id (wrapping uint64 arithmetic) below
    ``fraction`` of the 64-bit range means validation."""
    z = np.asarray(ids).astype(np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z < np.uint64(math.ceil(fraction * 18446744073709551616.0))


def is_val(product_id: int, fraction: float) -> bool:
    """``val_flags`` of one id."""
    return bool(val_flags(np.array([product_id], np.int64), fraction)[0])


def read_categories(path: str) -> List[Tuple[int, str, str, str]]:
    """Rows of category_names.csv sorted by category id; errors name the file and line."""
    if not os.path.isfile(path):
        raise RepackError(f"{path}: no such file; pass the competition's category_names.csv with --categories")
    rows, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "category_id":
            raise RepackError(f"{path}: expected a header starting with 'category_id' "
                              "(category_id,category_level1,category_level2,category_level3)")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                cid = int(row[0])
            except ValueError:
                raise RepackError(f"{path}:{line}: category_id {row[0]!r} is not an integer") from None
            if cid in seen:
                raise RepackError(f"{path}:{line}: category_id {cid} is listed twice")
            seen.add(cid)
            levels = (row[1:4] + ["", "", ""])[:3]
            rows.append((cid, *levels))
    if not rows:
        raise RepackError(f"{path}: lists no categories")
    return sorted(rows)


# ---- the per-chunk worker ------------------------------------------------------------------------
@dataclass
class Settings:
    bson_path: str
    out: str
    labelled: bool
    class_index: Dict[int, int]
    val_fraction: float
    verify: str
    max_doc_bytes: int
    max_image_bytes: int
    max_side: int = DEFAULT_MAX_SIDE


@dataclass
class ChunkResult:
    chunk: int
    shards: Dict[str, List[dict]] = field(default_factory=dict)  # group ("train", "products/k2/val") -> shards
    counts: Counter = field(default_factory=Counter)
    quarantine: List[list] = field(default_factory=list)
    order: List[Tuple[int, int, int]] = field(default_factory=list)  # unlabelled: (id, offset, images)
    hashes: Optional[np.ndarray] = None  # HASH_DTYPE rows of the written images (category: class index)
    sizes: Dict[str, Counter] = field(default_factory=dict)  # split -> Counter of written (width, height)


_progress = None  # shared counters (products, bytes) set by the pool initializer
_exclude: Dict[int, Dict[int, str]] = {}  # --exclude: product id -> {image index: reason}, set likewise
_PROGRESS_EVERY = 256  # products between updates of the shared counters
# manifest.json's "picture_sizes" of a split: the most common frame sizes, the rest counted as "other". A chunk
# keeps at most _CHUNK_SIZES distinct sizes (the rest go to "other" there already), so memory stays bounded
# on catalogues where nearly every picture has its own size.
PICTURE_SIZES = 32
_CHUNK_SIZES = 1024
OTHER_SIZES = "other"
_READ_BLOCK = 4 << 20  # BSON bytes read at a time into one reused buffer


def _init_worker(progress, exclude=None) -> None:
    global _progress, _exclude
    _progress = progress
    _exclude = exclude or {}


def _init_pool_worker(progress, exclude) -> None:
    # The driver alone answers Ctrl-C and SIGTERM: it terminates the pool (SIGTERM, the default action: no
    # traceback from each worker) and removes the temporaries the workers leave.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(progress, exclude)


def _report_progress(products: int, nbytes: int) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress[0] += products
            _progress[1] += nbytes


def _documents(path: str, offsets: np.ndarray, lengths: np.ndarray, max_doc_bytes: int):
    """Yield every document decoded (a dict), or the reason (a str) why it could not be.

    Reads blocks of about 4 MB into one reused buffer (reading a whole chunk into fresh memory costs more in
    page faults than the copy from the page cache) and decodes each with one ``bson.decode_all`` call (a
    call per document spends a third of its time converting the codec options). A block that does not
    decode is decoded document by document, which finds and names the bad ones."""
    ends = (offsets + lengths).tolist()
    too_big = np.flatnonzero(lengths > max_doc_bytes).tolist()
    offsets, lengths = offsets.tolist(), lengths.tolist()
    buf = memoryview(bytearray(_READ_BLOCK))
    with open(path, "rb", buffering=0) as f:
        i = 0
        while i < len(offsets):
            if lengths[i] > max_doc_bytes:
                yield f"document of {lengths[i]} bytes exceeds the {max_doc_bytes}-byte limit"
                i += 1
                continue
            if lengths[i] > len(buf):  # one large (but allowed) document: a buffer of its own
                buf = memoryview(bytearray(lengths[i]))
            start = offsets[i]
            j = bisect.bisect_right(ends, start + len(buf), i)  # documents i..j-1 fit the buffer
            big = bisect.bisect_left(too_big, i)
            if big < len(too_big):
                j = min(j, too_big[big])  # an oversized document is neither read nor decoded
            block = buf[:_read_into(f, start, buf[:ends[j - 1] - start])]  # short if the file shrank
            try:
                docs = bson.decode_all(block)
            except Exception:  # noqa: BLE001 - one bad document: see below which
                docs = []
            if len(docs) == j - i:
                yield from docs
            else:
                for k in range(i, j):
                    o = offsets[k] - start
                    yield _decode_one(block[o:o + lengths[k]])
            i = j


def _decode_one(data: memoryview):
    try:
        return bson.decode(data)
    except Exception as e:  # noqa: BLE001 - any decode failure quarantines just this document
        return f"BSON document does not decode ({type(e).__name__}: {e})"


def _read_into(f, offset: int, view: memoryview) -> int:
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


@functools.lru_cache(maxsize=256)
def _position_ints(k: int, end: int) -> List[bytes]:
    """The encoded ``image_index`` and ``num_images`` features of the image records of a product with ``k``
    written images, by image index (0 to ``end`` - 1)."""
    return [int_feature("image_index", j) + int_feature("num_images", k) for j in range(end)]


# write_one/write_fields take the int features encoded in schema order, which _process_chunk hard-codes:
# fail at import rather than write wrong records if the schema changes.
_IMAGE_INTS = [name for name, kind in IMAGE_FEATURES.items() if kind == "int64"]
_PRODUCT_INTS = [name for name, kind in product_features(1).items() if kind == "int64"]
if _IMAGE_INTS != ["label", "product_id", "image_index", "num_images"] or _PRODUCT_INTS != ["label", "product_id"]:
    raise RuntimeError("dali_pipes.repack encodes the int features in a fixed order; update it with the schema")


class _ChunkWriters:
    """The shard writers of one chunk, each opened on first use (a group without records has no shard)."""

    def __init__(self, out: str, chunk: int):
        self.out, self.chunk = out, chunk
        self.by_group: Dict[str, ShardWriter] = {}
        self.images: Dict[str, ShardWriter] = {}  # split -> image shard
        self.products: Dict[Tuple[str, int], ShardWriter] = {}  # (split, K) -> product shard

    def image_writer(self, split: str) -> ShardWriter:
        w = self.images.get(split)
        if w is None:
            w = self.images[split] = self._open(split, split, IMAGE_FEATURES)
        return w

    def product_writer(self, split: str, k: int) -> ShardWriter:
        w = self.products.get((split, k))
        if w is None:
            w = self.products[split, k] = self._open(f"products/k{k}/{split}", split, product_features(k))
        return w

    def _open(self, group: str, split: str, schema) -> ShardWriter:
        d = os.path.join(self.out, group)
        os.makedirs(d, exist_ok=True)
        w = self.by_group[group] = ShardWriter(os.path.join(d, f"{split}-{self.chunk:05d}.tfrecord"), schema)
        return w

    def count(self, counts: Counter) -> None:
        """Add the written products and images to ``counts``: each record is one of them."""
        for split, w in self.images.items():
            counts["images_written"] += w.records
            counts[f"{split}_images"] += w.records
        for (split, k), w in self.products.items():
            counts["products_written"] += w.records
            counts[f"{split}_products"] += w.records
            counts[f"k{k}_{split}"] += w.records

    def close(self, res: ChunkResult) -> None:
        for group, w in sorted(self.by_group.items()):
            info = w.close()
            info["path"] = os.path.relpath(w.path, self.out)
            info["index"] = os.path.relpath(w.idx_path, self.out)
            res.shards.setdefault(group, []).append(info)

    def abort(self) -> None:
        for w in self.by_group.values():
            w.abort()


def _quarantine(res: ChunkResult, pid, offset, image_index, reason, images=0) -> None:
    res.quarantine.append([pid, offset, image_index, reason])
    if image_index == "":
        res.counts["products_quarantined"] += 1
        res.counts["images_quarantined"] += images


def _read_product(st: Settings, check, res: ChunkResult, off: int, scan_id: int, kept_at: int, doc):
    """``(id, label, image indices, JPEG bytes)`` of a usable product (its good images); else None, with the
    product and its bad images in ``res``'s quarantine. ``doc`` is what ``_documents`` gave, ``scan_id`` the
    offset scan's ``_id`` (names a document that does not decode), ``kept_at`` the offset of the copy of a
    duplicated ``_id`` that is written (-1: this one, or the id is not duplicated)."""
    if type(doc) is str:
        _quarantine(res, "" if scan_id == OffsetIndex.MISSING_ID else scan_id, off, "", doc)
        return None
    pid = doc.get("_id")
    imgs = doc.get("imgs")
    n_imgs = len(imgs) if isinstance(imgs, list) else 0
    res.counts["images_read"] += n_imgs
    if isinstance(pid, bool) or not isinstance(pid, int):
        _quarantine(res, "", off, "", f"_id {pid!r} is missing or not an integer", n_imgs)
        return None
    if 0 <= kept_at < off:
        _quarantine(res, pid, off, "", f"duplicate _id (the copy at offset {kept_at} is kept)", n_imgs)
        return None
    label = -1
    if st.labelled:
        cat = doc.get("category_id")
        if cat is None:
            _quarantine(res, pid, off, "", "no category_id in a labelled run "
                        "(repack unlabelled files such as test.bson with --unlabelled)", n_imgs)
            return None
        label = st.class_index.get(cat, -1) if isinstance(cat, int) else -1
        if label < 0:
            _quarantine(res, pid, off, "", f"category_id {cat!r} is not in category_names.csv", n_imgs)
            return None
    if n_imgs == 0:
        _quarantine(res, pid, off, "", "product has no images")
        return None
    good: List[int] = []
    pics: List[bytes] = []
    sizes: List[Tuple[int, int]] = []  # (width, height) of each good picture's frame
    excluded = _exclude.get(pid) if _exclude else None
    n_excluded = 0
    for j, img in enumerate(imgs):
        pic = img.get("picture") if isinstance(img, dict) else None
        size = None
        if not isinstance(pic, (bytes, bytearray)):
            reason = "image entry has no 'picture' bytes"
        elif len(pic) > st.max_image_bytes:
            reason = f"image of {len(pic)} bytes exceeds the {st.max_image_bytes}-byte limit"
        else:
            reason, size = check(pic)
        if not reason and excluded is not None and j in excluded:
            reason = excluded[j]
            res.counts["images_excluded"] += 1
            n_excluded += 1
        if reason:
            res.quarantine.append([pid, off, j, reason])
            res.counts["images_quarantined"] += 1
        else:
            good.append(j)
            pics.append(pic if type(pic) is bytes else bytes(pic))
            sizes.append(size)
    if not good:
        _quarantine(res, pid, off, "", "all its images are excluded (see the image rows)" if n_excluded == n_imgs
                    else "no readable image (see the image rows)")
        return None
    return pid, label, good, pics, sizes


def _count_sizes(counter: Counter, sizes: List[Tuple[int, int]]) -> None:
    if len(counter) < _CHUNK_SIZES:
        counter.update(sizes)
    else:  # full: known sizes still count as themselves
        for s in sizes:
            counter[s if s in counter else OTHER_SIZES] += 1


def picture_sizes(counter: Counter, limit: Optional[int] = None) -> Dict[str, int]:
    """A split's manifest entry: ``{"WxH": pictures}`` of the ``limit`` (``PICTURE_SIZES``) most common frame
    sizes (most common first, ties by size), plus ``"other": pictures`` of all the other sizes when there are
    any."""
    limit = PICTURE_SIZES if limit is None else limit
    other = counter.get(OTHER_SIZES, 0)
    known = sorted(((n, s) for s, n in counter.items() if s != OTHER_SIZES), key=lambda t: (-t[0], t[1]))
    out = {f"{w}x{h}": n for n, (w, h) in known[:limit]}
    other += sum(n for n, _ in known[limit:])
    if other:
        out[OTHER_SIZES] = other
    return out


def _process_chunk(args) -> ChunkResult:
    st, chunk, offsets, lengths, ids, kept_at = args
    res = ChunkResult(chunk)
    writers = _ChunkWriters(st.out, chunk)
    check = make_check(st.verify, st.max_side)
    val = val_flags(ids, st.val_fraction).tolist() if st.labelled else None
    docs = _documents(st.bson_path, offsets, lengths, st.max_doc_bytes)
    offsets, lengths, ids = offsets.tolist(), lengths.tolist(), ids.tolist()
    label_ints: Dict[int, bytes] = {}
    digests: List[bytes] = []  # image_hash of each written image, with its product and label
    hash_ids: List[int] = []
    hash_labels: List[int] = []
    reported = 0  # documents counted in the progress report
    try:
        for i, (off, kept, doc) in enumerate(zip(offsets, kept_at.tolist(), docs)):
            if i - reported == _PROGRESS_EVERY:
                _report_progress(i - reported, sum(lengths[reported:i]))
                reported = i
            got = _read_product(st, check, res, off, ids[i], kept, doc)
            if got is None:
                if kept > off:  # an unusable copy of a duplicated _id: its product row was the last one added
                    res.quarantine[-1][3] += f" (duplicate _id: the copy at offset {kept} is kept)"
                continue
            pid, label, good, pics, sizes = got
            if kept > off:  # _duplicates found this copy unusable
                raise RepackError(f"{st.bson_path}: product {pid} at offset {off} reads otherwise than when the "
                                  "copy of its duplicated _id to keep was chosen: the file changed during the "
                                  "repack; re-run it on a file that does not change")
            k = len(good)
            if val is None:
                split = "test"
                res.order.append((pid, off, k))
            else:  # the id of the scan is the decoded one unless _id is not the document's first field
                split = "val" if (val[i] if ids[i] == pid else is_val(pid, st.val_fraction)) else "train"
            lab = label_ints.get(label) or label_ints.setdefault(label, int_feature("label", label))
            ints = lab + int_feature("product_id", pid)
            write_one = (writers.images.get(split) or writers.image_writer(split)).write_one
            positions = _position_ints(k, good[-1] + 1)
            _count_sizes(res.sizes.get(split) or res.sizes.setdefault(split, Counter()), sizes)
            for j, pic in zip(good, pics):
                write_one(pic, ints + positions[j])
            digests.extend(map(image_hash, pics))
            hash_ids.extend([pid] * k)
            hash_labels.extend([label] * k)
            kk = min(k, MAX_K)
            (writers.products.get((split, kk)) or writers.product_writer(split, kk)).write_fields(pics[:kk], ints)
        writers.close(res)
        res.hashes = np.zeros(len(digests), HASH_DTYPE)
        res.hashes["hash"] = np.frombuffer(b"".join(digests), "<u8")
        res.hashes["product_id"], res.hashes["category_id"] = hash_ids, hash_labels
    except BaseException:
        writers.abort()
        raise
    _report_progress(len(offsets) - reported, sum(lengths[reported:]))
    res.counts["products_read"] += len(offsets)
    writers.count(res.counts)
    return res


def _duplicates(index: OffsetIndex, st: Settings) -> np.ndarray:
    """Per document, the offset of the copy of its ``_id`` that is written, where that is another copy; else -1
    (not duplicated, the kept copy itself, or no copy is usable). The kept copy is the first usable one in file
    order, found here before the chunks run (a chunk sees only its own copies); duplicates are rare, so
    decoding them twice costs nothing that shows."""
    kept_at = np.full(len(index), -1, np.int64)
    known = np.flatnonzero(index.ids != OffsetIndex.MISSING_ID)
    _, which, n = np.unique(index.ids[known], return_inverse=True, return_counts=True)
    copies = known[n[which] > 1]  # file order
    check = make_check(st.verify, st.max_side)
    kept: Dict[int, int] = {}  # id -> offset of its first usable copy
    docs = _documents(st.bson_path, index.offsets[copies], index.lengths[copies], st.max_doc_bytes)
    for i, doc in zip(copies.tolist(), docs):
        pid, off = int(index.ids[i]), int(index.offsets[i])
        if pid not in kept and _read_product(st, check, ChunkResult(-1), off, pid, -1, doc):
            kept[pid] = off
    for i in copies.tolist():
        k = kept.get(int(index.ids[i]), -1)
        kept_at[i] = -1 if k == index.offsets[i] else k
    return kept_at


# ---- the driver ----------------------------------------------------------------------------------
_SAVE_BLOCK = 1 << 20  # hash rows gathered and written at a time


def _save_hashes(path: str, results: List[ChunkResult], category_ids: Optional[List[int]]) -> None:
    """``HASHES_FILE``: every chunk's hash rows, category ids instead of class indices (``category_ids``; None:
    unlabelled), sorted by (hash, product id, category id). The one sort of every image the repack does, in
    the driver: 24 bytes an image for the rows (each chunk's copy released as it is gathered), 8 for the sort
    order, then written in blocks (no sorted second copy): about 400 MB for the real train.bson's 12.4M images."""
    n = sum(len(r.hashes) for r in results)
    rows = np.zeros(n, HASH_DTYPE)
    at = 0
    for r in results:
        rows[at:at + len(r.hashes)] = r.hashes
        at += len(r.hashes)
        r.hashes = None
    if category_ids is not None:  # class index -> category id
        rows["category_id"] = np.asarray(category_ids, np.int64)[rows["category_id"]]
    order = np.lexsort((rows["category_id"], rows["product_id"], rows["hash"]))
    with atomic_open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(HASH_DTYPE),
                                                 "fortran_order": False, "shape": (n,)})
        for i in range(0, n, _SAVE_BLOCK):
            f.write(rows[order[i:i + _SAVE_BLOCK]].tobytes())


def _is_repack(out: str) -> bool:
    """Whether ``out`` holds a finished repack: a manifest of this format."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return isinstance(json.load(f).get("format_version"), int)
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out(out: str, overwrite: bool, bson_path: str) -> int:
    """Make ``out`` an unfinished repack (``REPACK_MARKER``) with none of a repack's files in it. ``out`` must
    be new, empty, a finished repack (with ``overwrite``) or an unfinished one that no live repack holds;
    anything else is refused. Returns the marker's locked descriptor (``_hold_marker``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RepackError(f"--out {out} is a file, not a directory; choose a new directory for the repack")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    finished = bool(names) and _is_repack(out)
    if finished and not overwrite:
        raise RepackError(f"{out} already holds a repacked dataset ({MANIFEST} exists); "
                          "pass --overwrite to replace it, or choose another --out")
    if names and not finished and REPACK_MARKER not in names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise RepackError(f"--out {out} is not empty ({shown}) and is not a repack's directory (no {MANIFEST} "
                          f"of a repack, no {REPACK_MARKER}); repack writes only into a new or empty directory, or "
                          "over its own: choose another --out (nothing was removed)")
    os.makedirs(out, exist_ok=True)
    lock = _hold_marker(out)
    os.ftruncate(lock, 0)
    os.write(lock, f"a repack of {bson_path} by pid {os.getpid()} started at "
                   f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; removed when {MANIFEST} is written\n"
             .encode())
    if finished:
        os.remove(os.path.join(out, MANIFEST))  # first: a crash from here on leaves no manifest, i.e. no dataset
    _remove_own_files(out)
    return lock


def _hold_marker(out: str) -> int:
    """The marker of ``out``, created if missing and locked (``flock``) for as long as this repack runs: a
    second repack into ``out`` meanwhile is refused instead of removing the first one's files. The lock goes
    with the process (and its workers), so the marker of a killed repack is free to take over."""
    path = os.path.join(out, REPACK_MARKER)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as f:
            what = f.read().strip()
        os.close(fd)
        raise RepackError(f"{out}: another repack is writing there now ({what}); wait for it to end, or choose "
                          "another --out (nothing was removed)") from None
    return fd


def _remove_own_files(out: str, temporaries_only: bool = False) -> None:
    """Remove the files a repack writes in ``out`` (or only their temporaries), nothing else; shard folders
    left empty go too. The marker stays."""
    def ours(name: str, allowed) -> bool:
        target = temp_target(name)
        return (not temporaries_only and allowed(name)) or (target is not None and allowed(target))

    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name == OCR_DIR and os.path.isdir(path) and not os.path.islink(path):
            remove_ocr_files(path, temporaries_only)  # tools.ocr's files go with the data they were read from
        elif name in SPLIT_DIRS and os.path.isdir(path) and not os.path.islink(path):
            for root, dirs, files in os.walk(path, topdown=False):
                for f in files:
                    if ours(f, _SHARD_FILE.fullmatch):
                        os.remove(os.path.join(root, f))
                for d in dirs:
                    _rmdir_if_empty(os.path.join(root, d))
            _rmdir_if_empty(path)
        elif os.path.isfile(path) and ours(name, _FILES.__contains__):
            os.remove(path)


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:  # not empty: something not ours is in it
        pass


class _QuarantineFile:
    """``quarantine.csv``, written as the chunks finish, so its rows are never all held in memory (on a
    catalogue where much is bad they could be millions). An atomic write: the file appears, whole, at
    ``commit``; until then its rows go to the temporary beside it (which ``_remove_own_files`` removes)."""

    def __init__(self, out: str):
        self._stack = contextlib.ExitStack()
        self._csv = self._stack.enter_context(atomic_csv(os.path.join(out, QUARANTINE_FILE), QUARANTINE_FIELDS))

    @property
    def rows(self) -> int:
        return self._csv.rows

    def write(self, rows: List[list]) -> None:
        self._csv.write(rows)

    def commit(self) -> None:
        self._stack.close()

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("repack failed"), None)  # the temporary is removed


def _show(bar: Progress, counters, force: bool = False) -> None:
    mb_s = counters[1] / max(time.time() - bar.t0, 1e-9) / 1e6
    bar.update(counters[0], extra=f"{mb_s:,.1f} MB/s", force=force)


def repack(bson_path: str, out: str, categories: Optional[str] = None, val_fraction: float = 0.01,
           workers: int = 1, shard_size_mb: float = 256, verify: str = DEFAULT_VERIFY, unlabelled: bool = False,
           overwrite: bool = False, max_doc_bytes: int = MAX_DOC_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES,
           max_side: int = DEFAULT_MAX_SIDE, progress: bool = True, exclude: Optional[str] = None,
           order: str = "shuffle", shuffle_seed: int = 0) -> dict:
    """Repack ``bson_path`` into ``out``; return the manifest. Raises ``RepackError`` for unusable input.

    ``exclude``: a CSV of images to leave out (``dali_pipes.writer.exclude``), each listed in quarantine.csv.
    ``order``: ``shuffle`` writes the train records in a random order seeded by ``shuffle_seed``
    (``dali_pipes.writer.shuffle``), ``file`` keeps the BSON's order."""
    if order not in ORDERS:
        raise RepackError(f"--order must be one of {', '.join(ORDERS)}, not {order!r}")
    if verify not in VERIFY_MODES:
        raise RepackError(f"--verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    if max_side < 1:
        raise RepackError(f"--max-side must be a positive number of pixels, not {max_side}")
    if not 0.0 <= val_fraction < 1.0:
        raise RepackError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    if not os.path.isfile(bson_path):
        raise RepackError(f"{bson_path}: no such file; pass the competition's train.bson (or test.bson "
                          "with --unlabelled) with --bson")
    if not unlabelled and not categories:
        raise RepackError("a labelled repack needs --categories category_names.csv "
                          "(or pass --unlabelled for test.bson)")
    cats = read_categories(categories) if categories else []
    try:
        excluded = read_exclude(exclude) if exclude else {}
    except ExcludeError as e:
        raise RepackError(str(e)) from None
    n_listed = sum(len(v) for v in excluded.values())
    class_index = {row[0]: i for i, row in enumerate(cats)}
    t0 = time.time()
    try:
        index = scan_offsets(bson_path)
    except BsonFileError as e:
        raise RepackError(str(e)) from None
    lock = _prepare_out(out, overwrite, bson_path)
    quarantine = None
    try:

        st = Settings(bson_path, out, not unlabelled, class_index, val_fraction, verify, max_doc_bytes,
                      max_image_bytes, max_side)
        _init_worker(None, excluded)
        kept_at = _duplicates(index, st)
        ranges = index.ranges(int(shard_size_mb * (1 << 20)))
        tasks = [(st, c, index.offsets[a:b], index.lengths[a:b], index.ids[a:b], kept_at[a:b])
                 for c, (a, b) in enumerate(ranges)]
        workers = max(1, min(workers, len(tasks) or 1))
        ctx = mp.get_context("fork")
        counters = ctx.Array("q", 2)
        bar = Progress("repack", len(index), "products", enabled=progress)
        results: List[ChunkResult] = []
        quarantine = _QuarantineFile(out)

        def finished(r: ChunkResult) -> None:  # a chunk's quarantine rows go to the file, not into results
            quarantine.write(r.quarantine)
            r.quarantine = []
            results.append(r)
        if workers == 1:
            _init_worker(counters, excluded)
            for t in tasks:
                finished(_process_chunk(t))
                _show(bar, counters)
        else:
            with ctx.Pool(workers, initializer=_init_pool_worker, initargs=(counters, excluded)) as pool:
                pending = pool.imap(_process_chunk, tasks)
                for _ in tasks:
                    while True:
                        try:
                            finished(pending.next(timeout=0.5))
                            break
                        except mp.TimeoutError:
                            _show(bar, counters)
                    _show(bar, counters)
        _show(bar, counters, force=True)
        bar.finish()
        _init_worker(None)

        counts: Counter = Counter()
        shards: Dict[str, List[dict]] = {}
        sizes: Dict[str, Counter] = {}
        for r in results:
            counts.update(r.counts)
            for split, c in r.sizes.items():
                sizes.setdefault(split, Counter()).update(c)
            for group, infos in r.shards.items():
                shards.setdefault(group, []).extend(infos)
        if order == "shuffle" and not unlabelled:
            shuffle_train_groups(out, shards, shuffle_seed, workers,
                                 functools.partial(_init_pool_worker, None, None))
        if not index.complete:
            quarantine.write([["", index.stop_offset, "", f"unreadable from here to the end of the file "
                               f"({index.file_size - index.stop_offset} bytes): {index.stop_reason}"]])
        for key in ("products_read", "products_written", "products_quarantined", "images_read",
                    "images_written", "images_quarantined"):
            counts.setdefault(key, 0)
        if (counts["products_read"] != counts["products_written"] + counts["products_quarantined"]
                or counts["images_read"] != counts["images_written"] + counts["images_quarantined"]):
            raise AssertionError(f"repack lost track of products or images: {dict(counts)}")  # a bug, not input

        # Side files first, the manifest last: a DATA directory with a manifest is complete.
        quarantine.commit()
        if cats:
            atomic_write_text(os.path.join(out, CLASSES_FILE), csv_text(
                ["index", "category_id", "category_level1", "category_level2", "category_level3"],
                [(i, *row) for i, row in enumerate(cats)]))
        if unlabelled:
            order = sorted((o for r in results for o in r.order), key=lambda t: t[1])
            atomic_write_text(os.path.join(out, PRODUCTS_FILE),
                              csv_text(["product_id", "offset", "num_images"], order))
        _save_hashes(os.path.join(out, HASHES_FILE), results, None if unlabelled else [c[0] for c in cats])
        split_names = ["train", "val"] if not unlabelled else ["test"]
        manifest = {
            "format_version": FORMAT_VERSION,
            "labelled": not unlabelled,
            "num_classes": len(cats),
            "splits": {s: {"products": counts[f"{s}_products"], "images": counts[f"{s}_images"],
                           "picture_sizes": picture_sizes(sizes.get(s, Counter())),
                           "shards": shards.get(s, [])} for s in split_names},
            "products_k": {str(k): {s: {"products": counts[f"k{k}_{s}"], "shards": shards.get(f"products/k{k}/{s}", [])}
                                    for s in split_names} for k in range(1, MAX_K + 1)},
            "counts": {k: counts[k] for k in ("products_read", "products_written", "products_quarantined",
                                              "images_read", "images_written", "images_quarantined")},
            "quarantine": {"rows": quarantine.rows, "products": counts["products_quarantined"],
                           "images": counts["images_quarantined"], "file": QUARANTINE_FILE},
            "exclude": None if not exclude else {
                "file": os.path.basename(exclude), "listed": n_listed, "images_excluded": counts["images_excluded"],
                "not_matched": n_listed - counts["images_excluded"]},
            "incomplete_source": None if index.complete else {
                "stop_offset": index.stop_offset, "reason": index.stop_reason,
                "unread_bytes": index.file_size - index.stop_offset},
            "settings": {"val_fraction": val_fraction, "shard_size_mb": shard_size_mb, "verify": verify,
                         "max_doc_bytes": max_doc_bytes, "max_image_bytes": max_image_bytes,
                         "max_side": max_side, "order": order,
                         "shuffle_seed": shuffle_seed if order == "shuffle" and not unlabelled else None},
            "source": {"bson": {"name": os.path.basename(bson_path), "size": index.file_size},
                       "categories": ({"name": os.path.basename(categories), "size": os.path.getsize(categories)}
                                      if categories else None)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 3),
        }
        atomic_write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    except BaseException:  # a failure or an interrupt (Ctrl-C, SIGTERM via fileio.interruptible)
        if quarantine is not None:
            quarantine.abort()
        _remove_own_files(out, temporaries_only=True)  # the workers are gone: the pool was terminated
        os.close(lock)
        raise
    os.remove(os.path.join(out, REPACK_MARKER))
    os.close(lock)
    return manifest
