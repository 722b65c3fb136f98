"""The writing side of the record format: a fast ``tf.train.Example`` encoder and a TFRecord shard writer
that writes DALI's index alongside. The schema and the reader live in ``dali_pipes.records``."""
from __future__ import annotations

import itertools
import os
import struct
from typing import Dict, List, Sequence, Tuple, Union

from ..fileio import atomic_open, temp_path_for
from ..records import _crc, index_path, mask_crc as _mask, masked_crc as _masked_crc

# ---- protobuf encoding -------------------------------------------------------------------------
def _varint_slow(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf does
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# The low 14 bits of a number of 2**14 or more as the first two bytes of its varint: product ids (< 2**30)
# take two lookups instead of a Python loop.
_LOW14 = [bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14)]
# Lengths of ~5 kB images, labels and image indices all fall in the table: one list lookup each.
_VARINTS = ([bytes((i,)) for i in range(1 << 7)]
            + [bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(1 << 7, 1 << 14)]
            + [_LOW14[i & 0x3FFF] + bytes((i >> 14,)) for i in range(1 << 14, 1 << 16)])


def _varint(n: int) -> bytes:
    if 0 <= n < 65536:
        return _VARINTS[n]
    if 0 <= n < 1 << 30:
        return _LOW14[n & 0x3FFF] + _VARINTS[n >> 14]
    return _varint_slow(int(n))


def _len_delim(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


# Pre-encoded pieces per feature name. A record is a handful of byte strings; the image bytes themselves
# are never copied in user space (``ShardWriter`` hands the pieces to ``os.writev``).
_BYTES_KEY: Dict[str, bytes] = {}
_INT_PREFIX: Dict[Tuple[str, int], bytes] = {}
_BYTES_PREFIX: Dict[Tuple[bytes, int], bytes] = {}
_MAX_MEMO = 1 << 16  # entries per memo dict; past that it starts over (bounds memory on odd data)


def _key(name: str) -> bytes:
    k = _BYTES_KEY.get(name)
    if k is None:
        k = _BYTES_KEY[name] = _len_delim(0x0A, name.encode())  # map entry field 1: the name
    return k


def _int_prefix(name: str, n: int) -> bytes:
    """Everything of an int64 feature's map entry before its ``n``-byte varint value."""
    p = _INT_PREFIX.get((name, n))
    if p is None:
        key = _key(name)
        # entry{key, value(2): Feature{int64_list(3): Int64List{value(1) packed: n bytes}}}
        inner = bytes((0x1A, n + 2, 0x0A, n))
        entry_len = len(key) + 2 + len(inner) + n
        p = _INT_PREFIX[(name, n)] = b"\x0a" + _varint(entry_len) + key + bytes((0x12, len(inner) + n)) + inner
    return p


def _bytes_prefix(key: bytes, n: int) -> bytes:
    """Everything of a bytes feature's map entry (``key`` from ``_key``) before its ``n`` value bytes."""
    p = _BYTES_PREFIX.get((key, n))
    if p is None:
        ln = _varint(n)
        bl = 1 + len(ln) + n  # BytesList{value(1): v}
        blv = _varint(bl)
        feat = 1 + len(blv) + bl  # Feature{bytes_list(1): BytesList}
        featv = _varint(feat)
        entry = len(key) + 1 + len(featv) + feat
        p = b"".join((b"\x0a", _varint(entry), key, b"\x12", featv, b"\x0a", blv, b"\x0a", ln))
        if len(_BYTES_PREFIX) >= _MAX_MEMO:
            _BYTES_PREFIX.clear()
        _BYTES_PREFIX[(key, n)] = p
    return p


def int_feature(name: str, value: int) -> bytes:
    """One int64 feature encoded as in an Example (its map entry): the pieces ``ShardWriter.write_fields``
    takes, joined in schema order."""
    vv = _varint(value)
    return (_INT_PREFIX.get((name, len(vv))) or _int_prefix(name, len(vv))) + vv


def encode_example(values: Dict[str, Union[bytes, int]], schema: Dict[str, str]) -> bytes:
    """Serialize a ``tf.train.Example`` holding exactly the schema's features."""
    parts = []
    for name, kind in schema.items():
        v = values[name]
        if kind == "bytes":
            parts.append(_bytes_prefix(_key(name), len(v)))
            parts.append(v)
        else:
            parts.append(int_feature(name, v))
    body = b"".join(parts)
    return b"\x0a" + _varint(len(body)) + body  # Example.features


_PACK_U32 = struct.Struct("<I").pack
_PACK_U64 = struct.Struct("<Q").pack
_IOV_MAX = 1024  # Linux's limit on the buffers of one writev call
_FLUSH_PIECES = 1000  # pending pieces that trigger a write (~300 image records, ~1.5 MB)


def _frame_header(payload_len: int) -> bytes:
    """uint64 length + uint32 masked CRC of those 8 bytes."""
    n = _PACK_U64(payload_len)
    return n + _PACK_U32(_mask(_crc(n)))


_PAYLOAD_HEADS: Dict[int, Tuple[bytes, int]] = {}


def _payload_head(body: int) -> Tuple[bytes, int]:
    """Frame header and Example header of a record whose Example.features hold ``body`` bytes, and the CRC
    of the Example header (the start of the payload). Memoized: image records repeat a few thousand sizes."""
    hit = _PAYLOAD_HEADS.get(body)
    if hit is None:
        ex = b"\x0a" + _varint(body)
        hit = (_frame_header(len(ex) + body) + ex, _crc(ex))
        if len(_PAYLOAD_HEADS) >= _MAX_MEMO:
            _PAYLOAD_HEADS.clear()
        _PAYLOAD_HEADS[body] = hit
    return hit


def _index_text(sizes: List[int]) -> str:
    offsets = itertools.accumulate(sizes, initial=0)
    # One %-format over all records runs in C; same text as an f"{offset} {size}\n" per record.
    return ("%d %d\n" * len(sizes)) % tuple(itertools.chain.from_iterable(zip(offsets, sizes)))


# Per first bytes-feature key: (length of the ints << 32 | the blob's length) -> (lead, CRC of its payload
# part, frame size less the blob), where the lead is everything of a one-blob record before the blob.
# Shared by all writers of a process: image records repeat a few thousand sizes.
_LEADS: Dict[bytes, Dict[int, Tuple[bytes, int, int]]] = {}


class ShardWriter:
    """Writes one TFRecord shard and its DALI index atomically: both appear only on ``close()``.

    Records are kept as byte pieces (frame header and encoded prefixes, the caller's image bytes, the rest
    and the CRC) and written with ``os.writev`` every ~1000 pieces: one system call per few hundred records,
    and no copy of the images in this process."""

    def __init__(self, path: str, schema: Dict[str, str]):
        self.path, self.schema = path, schema
        self.idx_path = index_path(path)
        self._tmp = temp_path_for(path)
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_TRUNC)
        self._pending: List[bytes] = []  # pieces of whole records not written yet
        self._written = 0  # bytes handed to the file so far
        self._sizes: List[int] = []  # frame size of every record, for the index
        self.offset = 0  # bytes of the records so far
        kinds = list(schema.values())
        nb = kinds.count("bytes")
        # The fast paths need the bytes features first (both record schemas of DESIGN.md are so).
        self._blob_keys = (tuple(_key(name) for name in list(schema)[:nb])
                           if nb and all(k == "bytes" for k in kinds[:nb]) else ())
        self._leads = _LEADS.setdefault(self._blob_keys[0], {}) if self._blob_keys else {}

    @property
    def records(self) -> int:
        return len(self._sizes)

    def write(self, values: Dict[str, Union[bytes, int]]) -> None:
        """Append one record holding ``values`` (a value for every feature of the schema)."""
        payload = encode_example(values, self.schema)
        n = len(payload)
        self._pending.extend((_frame_header(n), payload, _PACK_U32(_masked_crc(payload))))
        self._added(n + 16)

    def write_fields(self, blobs: Sequence[bytes], ints: bytes) -> None:
        """``write`` without a dict, same bytes in the file: ``blobs`` are the values of the bytes features
        (which lead the schema) in schema order, ``ints`` the ``int_feature(name, value)`` of each int feature
        joined in schema order. Blobs must be ``bytes``: they are kept, not copied, until written."""
        keys = self._blob_keys
        if not keys:
            raise ValueError(f"write_fields needs a schema whose bytes features come first; {self.path} has "
                             f"{list(self.schema.items())}")
        if len(blobs) != len(keys):
            raise ValueError(f"write_fields needs {len(keys)} blobs for {self.path}, not {len(blobs)}")
        if len(keys) == 1:
            self.write_one(blobs[0], ints)
            return
        rest: List[bytes] = []  # prefix, blob, prefix, blob, ... of the blobs after the first
        for key, blob in zip(keys[1:], blobs[1:]):
            rest.append(_bytes_prefix(key, len(blob)))
            rest.append(blob)
        first = blobs[0]
        after = sum(map(len, rest)) + len(ints)
        lead, crc = self._lead(len(first), after)
        crc = _crc(first, crc)
        for piece in rest:
            crc = _crc(piece, crc)
        crc = _crc(ints, crc)
        self._pending.extend((lead, first, *rest, ints + _PACK_U32(_mask(crc))))
        self._added(len(lead) + len(first) + after + 4)

    def write_one(self, blob: bytes, ints: bytes) -> None:
        """``write_fields((blob,), ints)`` for a schema with one bytes feature: the image records' hot path."""
        if len(self._blob_keys) != 1:
            raise ValueError(f"write_one needs a schema with one leading bytes feature for {self.path}")
        n = len(blob)
        key = len(ints) << 32 | n  # the ints are a few dozen bytes, an image far less than 4 GiB
        lead, crc, overhead = self._leads.get(key) or self._memo_lead(key, n, len(ints))
        crc = _crc(ints, _crc(blob, crc))
        masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # _mask, inlined on the hot path
        self._pending += (lead, blob, ints + _PACK_U32(masked))
        self._sizes.append(overhead + n)
        self.offset += overhead + n
        if len(self._pending) >= _FLUSH_PIECES:
            self._flush()

    def _lead(self, n: int, after: int) -> Tuple[bytes, int]:
        """Everything of a record before its first blob (``n`` bytes, followed by ``after`` more payload
        bytes): frame header, Example header and the blob's prefix; and the CRC of its payload part."""
        prefix = _bytes_prefix(self._blob_keys[0], n)
        head, crc = _payload_head(len(prefix) + n + after)
        return head + prefix, _crc(prefix, crc)

    def _memo_lead(self, key: int, n: int, after: int) -> Tuple[bytes, int, int]:
        """``_lead`` plus the frame's size less the blob, memoized for ``write_one``."""
        lead, crc = self._lead(n, after)
        if len(self._leads) >= _MAX_MEMO:
            self._leads.clear()
        out = self._leads[key] = (lead, crc, len(lead) + after + 4)
        return out

    def _added(self, size: int) -> None:
        self._sizes.append(size)
        self.offset += size
        if len(self._pending) >= _FLUSH_PIECES:
            self._flush()

    def _flush(self) -> None:
        pending, todo = self._pending, self.offset - self._written
        if not pending:
            return
        done = os.writev(self._fd, pending) if len(pending) <= _IOV_MAX else 0
        if done < todo:  # a short write (or too many pieces for one call): the rest as one buffer
            rest = memoryview(b"".join(pending))[done:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._pending = []
        self._written = self.offset

    def close(self) -> Dict[str, object]:
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        # Index first, then the shard: a shard never exists without its index.
        with atomic_open(self.idx_path, "w") as f:
            f.write(_index_text(self._sizes))
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        return {"records": self.records, "bytes": self.offset}

    def abort(self) -> None:
        self._pending = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


