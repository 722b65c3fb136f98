"""The record format, defined once: what the writer (``dali_pipes.writer``) writes and every reader reads.

The schema of image and product records, the manifest's name and version, DALI's index files, and a plain
reader of TFRecord files (tests, tools). Nothing here imports the writer, so opening a DATA directory needs
neither pymongo nor the encoder.

TFRecord framing: uint64 length, uint32 masked crc32c(length), payload, uint32 masked crc32c(payload).
The payload is a serialized ``tf.train.Example``; we encode and parse that small protobuf by hand, which is
several times faster than generic protobuf code and needs no TensorFlow.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Tuple, Union

import crc32c as _crc32c

MANIFEST = "manifest.json"  # written last: a directory without it is not a dataset
FORMAT_VERSION = 1
# The other files of a DATA directory (beside the shard folders of SPLIT_DIRS)
CLASSES_FILE = "classes.csv"  # class index -> category id and names (labelled repacks)
QUARANTINE_FILE = "quarantine.csv"  # every product or image not written, with the reason
PRODUCTS_FILE = "products.csv"  # unlabelled repacks: the written products in file order
HASHES_FILE = "image_hashes.npy"  # a 64-bit hash of every written image (tools.predict --dedup)
SPLIT_DIRS = ("train", "val", "test", "products")  # image shards per split; products/k{K}/{split}/
# Written into the directory before anything else and removed once the manifest is written: a directory
# with it is an unfinished repack, whose files a re-run may remove (repack removes nothing elsewhere).
REPACK_MARKER = ".repack-unfinished"
OCR_DIR = "ocr"  # what tools.ocr writes (dali_pipes/ocr_files.py); a repack over DATA removes its files too

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



def index_path(tfrecord_path: str) -> str:
    """``X.tfrecord`` -> ``X.idx`` (DALI's index format: ``offset size`` per line)."""
    base = tfrecord_path[: -len(".tfrecord")] if tfrecord_path.endswith(".tfrecord") else tfrecord_path
    return base + ".idx"


# ---- reading -------------------------------------------------------------------------------------
_crc = _crc32c.crc32c  # crc32c(data, value) continues a CRC: a payload's CRC is taken piece by piece


def mask_crc(crc: int) -> int:
    """TFRecord's masked CRC."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    return mask_crc(_crc(data))


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
            if verify_crc and (struct.unpack("<I", header[8:])[0] != masked_crc(header[:8])
                               or struct.unpack("<I", footer)[0] != masked_crc(payload)):
                raise RecordError(f"{path}: CRC mismatch in record at offset {offset}; re-run tools.repack")
            yield payload
            offset += 16 + n


def read_examples(path: str) -> Iterator[Dict[str, Union[bytes, int, List]]]:
    for payload in iter_records(path):
        yield decode_example(payload)


def read_index(path: str) -> List[Tuple[int, int]]:
    with open(path) as f:
        return [tuple(int(x) for x in line.split()) for line in f if line.strip()]

