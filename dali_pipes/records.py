"""The record schema (defined once), a fast TFRecord writer that writes DALI's index alongside, and a reader.

TFRecord framing: uint64 length, uint32 masked crc32c(length), payload, uint32 masked crc32c(payload).
The payload is a serialized ``tf.train.Example``; we encode and parse that small protobuf by hand, which is
several times faster than generic protobuf code and needs no TensorFlow.
"""
from __future__ import annotations

import os
import struct
from typing import Dict, Iterator, List, Tuple, Union

import crc32c as _crc32c

# ---- schema -------------------------------------------------------------------------------------
# Feature name -> kind ("bytes" or "int64"). Writer, reader and DALI pipelines all use these.
IMAGE_FEATURES: Dict[str, str] = {
    "image": "bytes",  # the original JPEG bytes, never re-encoded
    "label": "int64",  # class index into classes.csv (-1 when unlabelled)
    "product_id": "int64",
    "image_index": "int64",  # position of the image in the product's ``imgs`` list in the BSON
    "num_images": "int64",  # images of this product that were written
}
MAX_K = 4


def product_features(k: int) -> Dict[str, str]:
    """Schema of a product record with ``k`` images (tiled-product fine-tuning)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"product records hold 1..{MAX_K} images, not {k}")
    feats = {f"image_{i}": "bytes" for i in range(k)}
    feats.update({"label": "int64", "product_id": "int64"})
    return feats


def dali_features(schema: Dict[str, str]):
    """The ``features`` argument of ``fn.readers.tfrecord`` for a schema."""
    import nvidia.dali.tfrecord as tfrec

    out = {}
    for name, kind in schema.items():
        if kind == "bytes":
            out[name] = tfrec.FixedLenFeature((), tfrec.string, "")
        else:
            out[name] = tfrec.FixedLenFeature([1], tfrec.int64, -1)
    return out


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


# Lengths of ~5 kB images, labels and image indices all fall in the table: one list lookup each.
_VARINTS = [_varint_slow(i) for i in range(1 << 16)]


def _varint(n: int) -> bytes:
    return _VARINTS[n] if 0 <= n < 65536 else _varint_slow(n)


def _len_delim(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


# Pre-encoded pieces per feature name. A record is a handful of byte strings joined once; the image bytes
# are copied only by that join. This keeps encoding a small share of the repack's time.
_BYTES_KEY: Dict[str, bytes] = {}
_INT_PREFIX: Dict[Tuple[str, int], bytes] = {}


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


def encode_example(values: Dict[str, Union[bytes, int]], schema: Dict[str, str]) -> bytes:
    """Serialize a ``tf.train.Example`` holding exactly the schema's features."""
    parts = []
    for name, kind in schema.items():
        v = values[name]
        if kind == "bytes":
            n = len(v)
            ln = _VARINTS[n] if n < 65536 else _varint_slow(n)
            bl = 1 + len(ln) + n  # BytesList{value(1): v}
            blv = _varint(bl)
            feat = 1 + len(blv) + bl  # Feature{bytes_list(1): BytesList}
            featv = _varint(feat)
            key = _key(name)
            entry = len(key) + 1 + len(featv) + feat
            parts.append(b"".join((b"\x0a", _varint(entry), key, b"\x12", featv, b"\x0a", blv, b"\x0a", ln)))
            parts.append(v)
        else:
            vv = _VARINTS[v] if 0 <= v < 65536 else _varint_slow(int(v))
            p = _INT_PREFIX.get((name, len(vv))) or _int_prefix(name, len(vv))
            parts.append(p)
            parts.append(vv)
    body = b"".join(parts)
    return b"\x0a" + _varint(len(body)) + body  # Example.features


def _read_varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def decode_example(data: bytes) -> Dict[str, Union[bytes, int, List]]:
    """Parse a serialized Example into {name: bytes | int | list}; single values are unwrapped."""
    buf = memoryview(data)

    def fields(start: int, end: int) -> Iterator[Tuple[int, int, object]]:
        pos = start
        while pos < end:
            tag, pos = _read_varint(buf, pos)
            num, wt = tag >> 3, tag & 7
            if wt == 2:
                n, pos = _read_varint(buf, pos)
                yield num, wt, (pos, pos + n)
                pos += n
            elif wt == 0:
                v, pos = _read_varint(buf, pos)
                yield num, wt, v
            else:
                raise ValueError(f"unsupported protobuf wire type {wt}")

    out: Dict[str, Union[bytes, int, List]] = {}
    for _, _, (fs, fe) in fields(0, len(buf)):  # Example.features
        for _, _, (es, ee) in fields(fs, fe):  # map entries
            name, value = None, []
            for num, _, span in fields(es, ee):
                if num == 1:
                    name = bytes(buf[span[0]:span[1]]).decode()
                    continue
                for kind, _, (ls, le) in fields(*span):  # Feature oneof
                    for vnum, wt, item in fields(ls, le):
                        if kind == 1:
                            value.append(bytes(buf[item[0]:item[1]]))
                        elif kind == 3 and wt == 0:
                            value.append(item - (1 << 64) if item >= 1 << 63 else item)
                        elif kind == 3:  # packed int64
                            p = item[0]
                            while p < item[1]:
                                v, p = _read_varint(buf, p)
                                value.append(v - (1 << 64) if v >= 1 << 63 else v)
                        else:
                            raise ValueError("float features are not part of this schema")
            out[name] = value[0] if len(value) == 1 else value
    return out


# ---- framing -----------------------------------------------------------------------------------
def _masked_crc(data: bytes) -> int:
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def index_path(tfrecord_path: str) -> str:
    """``X.tfrecord`` -> ``X.idx`` (DALI's index format: ``offset size`` per line)."""
    base = tfrecord_path[: -len(".tfrecord")] if tfrecord_path.endswith(".tfrecord") else tfrecord_path
    return base + ".idx"


class ShardWriter:
    """Writes one TFRecord shard and its DALI index atomically: both appear only on ``close()``."""

    def __init__(self, path: str, schema: Dict[str, str]):
        self.path, self.schema = path, schema
        self.idx_path = index_path(path)
        self._tmp = f"{path}.tmp{os.getpid()}"
        self._f = open(self._tmp, "wb", buffering=4 << 20)
        self._index: List[str] = []
        self.offset = 0
        self.records = 0

    def write(self, values: Dict[str, Union[bytes, int]]) -> None:
        payload = encode_example(values, self.schema)
        n = len(payload)
        header = struct.pack("<Q", n)
        frame = b"".join((header, struct.pack("<I", _masked_crc(header)), payload,
                          struct.pack("<I", _masked_crc(payload))))
        self._f.write(frame)
        self._index.append(f"{self.offset} {len(frame)}\n")
        self.offset += len(frame)
        self.records += 1

    def close(self) -> Dict[str, object]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        idx_tmp = f"{self.idx_path}.tmp{os.getpid()}"
        with open(idx_tmp, "w") as f:
            f.writelines(self._index)
        # Index first, then the shard: a shard never exists without its index.
        os.replace(idx_tmp, self.idx_path)
        os.replace(self._tmp, self.path)
        return {"records": self.records, "bytes": self.offset}

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


class RecordError(ValueError):
    pass


def iter_records(path: str, verify_crc: bool = True) -> Iterator[bytes]:
    """Yield the payloads of a TFRecord file, checking CRCs."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise RecordError(f"{path}: truncated record header at offset {offset}; re-run tools.repack")
            (n,) = struct.unpack("<Q", header[:8])
            payload = f.read(n)
            footer = f.read(4)
            if len(payload) < n or len(footer) < 4:
                raise RecordError(f"{path}: truncated record at offset {offset}; re-run tools.repack")
            if verify_crc and (struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8])
                               or struct.unpack("<I", footer)[0] != _masked_crc(payload)):
                raise RecordError(f"{path}: CRC mismatch in record at offset {offset}; re-run tools.repack")
            yield payload
            offset += 16 + n


def read_examples(path: str) -> Iterator[Dict[str, Union[bytes, int, List]]]:
    for payload in iter_records(path):
        yield decode_example(payload)


def read_index(path: str) -> List[Tuple[int, int]]:
    with open(path) as f:
        return [tuple(int(x) for x in line.split()) for line in f if line.strip()]
