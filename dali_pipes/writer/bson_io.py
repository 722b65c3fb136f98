"""Reading Cdiscount BSON dumps: a streaming product iterator and a fast offset index.

A dump is a concatenation of BSON documents, each starting with its int32 little-endian length. The offset
index reads only those length prefixes (and the leading ``_id`` when it is the first field, as in the
competition's files), so work can be split by byte ranges and any product read at random, in memory that
does not grow with the file.
"""
from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import bson
import numpy as np

MAX_DOC_BYTES = 16 * 1024 * 1024  # MongoDB's own document limit; anything larger is not a product
_HEAD = 64  # bytes read at each document start: length prefix + the leading _id element


class BsonFileError(RuntimeError):
    """The file cannot be read as a BSON dump at all (empty, not BSON)."""


@dataclass
class OffsetIndex:
    """Where every whole document of a BSON file starts, with its length and (when cheap) its ``_id``."""

    path: str
    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int64
    ids: np.ndarray  # int64; ``MISSING_ID`` where the _id is not the first field or not an integer
    file_size: int
    stop_offset: Optional[int] = None  # set when the scan stopped before the end of the file
    stop_reason: str = ""

    MISSING_ID = np.iinfo(np.int64).min

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def complete(self) -> bool:
        return self.stop_offset is None

    def ranges(self, target_bytes: int) -> List[Tuple[int, int]]:
        """Split the documents into contiguous [start, end) index ranges of about ``target_bytes`` each."""
        if len(self) == 0:
            return []
        ends = np.cumsum(self.lengths)
        cuts = np.searchsorted(ends, np.arange(target_bytes, ends[-1], target_bytes), side="left") + 1
        bounds = [0] + sorted(set(int(c) for c in cuts if 0 < c < len(self))) + [len(self)]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _leading_id(head: bytes) -> int:
    """The integer ``_id`` when it is the first element of the document, else MISSING_ID."""
    if len(head) >= 13 and head[5:9] == b"_id\x00":
        if head[4] == 0x10:  # int32
            return struct.unpack_from("<i", head, 9)[0]
        if head[4] == 0x12 and len(head) >= 17:  # int64
            return struct.unpack_from("<q", head, 9)[0]
    return OffsetIndex.MISSING_ID


def scan_offsets(path: str) -> OffsetIndex:
    """Index the documents of a BSON dump by reading only their heads.

    Raises ``BsonFileError`` for an empty file or one that does not start like BSON. A file that goes bad
    later (truncated, garbage) yields the index of the whole documents before that point, with
    ``stop_offset``/``stop_reason`` saying where and why it stopped. Whole documents of any size are kept
    in the index (the repacker quarantines oversized ones); an implausible length ends the scan.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise BsonFileError(f"{path} is empty (0 bytes): the download or copy did not complete; "
                            "fetch the file again")
    # Typed arrays, 8 bytes an entry: a list of Python ints costs ~36 bytes an entry (760 MB for the real
    # train.bson's 7.07M documents x 3) and then a copy to numpy on top.
    offsets, lengths, ids = array("q"), array("q"), array("q")
    stop_offset, stop_reason = None, ""
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < size:
            # Read from one byte before the document: that byte must be the 0 that ends the previous one.
            back = 1 if pos else 0
            f.seek(pos - back)
            chunk = f.read(_HEAD + back)
            if back and chunk[0] != 0:
                offsets.pop(), lengths.pop(), ids.pop()
                pos -= int(prev_len)
                stop_offset, stop_reason = pos, "document does not end with a 0 byte (corrupt data)"
                break
            head = chunk[back:]
            if len(head) < 5:
                stop_offset, stop_reason = pos, f"file ends {len(head)} bytes into a document header"
                break
            (n,) = struct.unpack_from("<i", head, 0)
            if n < 5:
                stop_offset, stop_reason = pos, f"invalid document length {n}"
                break
            if pos + n > size:
                stop_offset = pos
                stop_reason = f"document claims {n} bytes but only {size - pos} remain (file truncated)"
                break
            offsets.append(pos)
            lengths.append(n)
            ids.append(_leading_id(head))
            prev_len = n
            pos += n
        if stop_offset is None and offsets:
            f.seek(size - 1)
            if f.read(1) != b"\x00":
                offsets.pop(), lengths.pop(), ids.pop()
                stop_offset, stop_reason = size - prev_len, "last document does not end with a 0 byte"
    if not offsets and stop_offset == 0:
        raise BsonFileError(f"{path} does not look like a BSON dump: {stop_reason} at offset 0; "
                            "expected MongoDB BSON documents such as the competition's train.bson/test.bson")
    return OffsetIndex(path, _to_numpy(offsets), _to_numpy(lengths), _to_numpy(ids), size, stop_offset, stop_reason)


def _to_numpy(a: array) -> np.ndarray:
    """The entries of ``a`` as an int64 array (one copy, then ``a`` is emptied: never two copies of three)."""
    out = np.frombuffer(a, np.int64).copy() if len(a) else np.zeros(0, np.int64)
    del a[:]
    return out


def read_document(path: str, offset: int, length: Optional[int] = None) -> dict:
    """Read and decode the one document that starts at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        if length is None:
            (length,) = struct.unpack("<i", f.read(4))
            f.seek(offset)
        data = f.read(length)
    return bson.decode(data)


def iter_products(path: str) -> Iterator[dict]:
    """Stream the products of a BSON dump in file order (constant memory)."""
    with open(path, "rb") as f:
        yield from bson.decode_file_iter(f)
