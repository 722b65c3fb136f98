"""The OCR directory of a repack (``DATA/ocr/``, written by ``tools.ocr``): its format, the model's text
input derived from the words, and a checked reader.

Layout: one file per unit of ``UNIT_RECORDS`` consecutive records of an image shard,
``ocr/{split}/{shard}-{first record:08d}.npz`` (numpy, no pickles), written atomically; then
``ocr/manifest.json``, written last. A unit holds, per record of its range in shard order: the product id
and image index (the key), the recognized words with their recognizer confidences, and the text-branch
input: hashed ids of the words and of their character 3-grams (``text_ids``). Every unit and the manifest
carry the repack's fingerprint (``repack_fingerprint``: the image shards' names, sizes and index files), so
an OCR directory made from another repack, or from the same BSON repacked in another order, is refused.
Nothing here imports the OCR engine: reading needs numpy only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import unicodedata
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .dataset import Dataset, DatasetError
from .fileio import temp_target
from .records import MANIFEST, OCR_DIR

OCR_FORMAT_VERSION = 1
UNIT_RECORDS = 4096  # records per unit: the work lost to a kill is at most one unit per worker
UNIT_FILE = re.compile(r"(train|val|test)-\d{5}-\d{8}\.npz")  # what tools.ocr names a unit
IMAGE_SPLITS = ("train", "val", "test")
# The model input: ids in [1, buckets) of each word and of its character n-grams (with < > at the ends),
# crc32-hashed (stable across processes and machines, unlike Python's hash()).
HASHING = {"scheme": "crc32", "buckets": 1 << 18, "ngrams": [3], "min_score": 0.5,
           "normalize": "lower, accents removed (NFKD), letters and digits only"}


# The reading settings a model's text branch is trained with (kept in its checkpoint: predict --bson reads
# the test pictures with the same)
READ_SETTINGS = ("det_size", "angle_cls")


def is_ocr_file(name: str) -> bool:
    """A file name tools.ocr writes under DATA/ocr (a unit or the manifest)."""
    return name == MANIFEST or UNIT_FILE.fullmatch(name) is not None


def remove_ocr_files(d: str, temporaries_only: bool = False) -> None:
    """Remove what tools.ocr writes in ``d`` (DATA/ocr): units, the manifest, their temporaries (or only
    those); nothing else. Folders left empty go too."""
    for top, dirs, files in os.walk(d, topdown=False):
        for f in files:
            target = temp_target(f)
            if (target is not None and is_ocr_file(target)) or (not temporaries_only and is_ocr_file(f)):
                os.remove(os.path.join(top, f))
        for sub in dirs:
            with contextlib.suppress(OSError):  # not empty: something not ours is in it
                os.rmdir(os.path.join(top, sub))
    with contextlib.suppress(OSError):
        os.rmdir(d)


class OcrError(DatasetError):
    """An OCR directory that cannot be used as it is; the message names the file and what to do."""


def ocr_command(root: str) -> str:
    return f"python -m tools.ocr --data {root}"


def normalize_word(word: str) -> str:
    """A word as the text branch sees it: lower case, accents removed (é -> e, œ -> oe), letters and
    digits only. PP-OCRv4 reads no accented letters: the titles' words and the recognized ones meet here."""
    word = word.lower().replace("œ", "oe").replace("æ", "ae")
    word = "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))
    return "".join(c for c in word if c.isalnum())


def _bucket(key: str, buckets: int) -> int:
    return 1 + zlib.crc32(key.encode("utf-8")) % (buckets - 1)


def text_ids(words: Sequence[str], scores: Sequence[float], hashing: dict = HASHING) -> List[int]:
    """The text-branch input of one picture: for each word read with at least ``min_score``, its id and the
    ids of its character n-grams. A picture without text gives an empty list."""
    ids: List[int] = []
    b = hashing["buckets"]
    for w, s in zip(words, scores):
        w = normalize_word(w)
        if not w or s < hashing["min_score"]:
            continue
        ids.append(_bucket("w:" + w, b))
        padded = f"<{w}>"
        for n in hashing["ngrams"]:
            ids.extend(_bucket("g:" + padded[i:i + n], b) for i in range(len(padded) - n + 1))
    return ids


def shard_fingerprint(root: str, info: dict) -> str:
    """A shard's identity: its name, record count, size and the bytes of its index (record sizes in order)."""
    with open(os.path.join(root, info["index"]), "rb") as f:
        idx = hashlib.sha1(f.read()).hexdigest()
    return f"{info['path']}:{info['records']}:{info['bytes']}:{idx}"


def image_shards(ds: Dataset) -> List[Tuple[str, dict]]:
    """``(split, shard info)`` of every image shard of the repack, in manifest order."""
    return [(s, info) for s in IMAGE_SPLITS if s in ds.manifest["splits"] for info in ds.shard_infos(s)]


def repack_fingerprint(ds: Dataset) -> Tuple[str, Dict[str, str]]:
    """``(fingerprint of the repack, {shard path: shard fingerprint})``."""
    per = {info["path"]: shard_fingerprint(ds.root, info) for _, info in image_shards(ds)}
    h = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(per.items())).encode()).hexdigest()[:32]
    return h, per


def unit_name(shard_path: str, start: int) -> str:
    base = os.path.basename(shard_path)[: -len(".tfrecord")]
    return f"{base}-{start:08d}.npz"


def unit_path(root: str, split: str, shard_path: str, start: int) -> str:
    return os.path.join(root, OCR_DIR, split, unit_name(shard_path, start))


def load_unit(path: str, expect_shard: str, start: int, records: int, root: str) -> Dict[str, np.ndarray]:
    """A unit's arrays, checked: readable, made from the shard with fingerprint ``expect_shard``, holding
    ``records`` records from ``start``. Any failure is an ``OcrError`` naming the file and what to do."""
    try:
        with np.load(path, allow_pickle=False) as z:
            u = {k: z[k] for k in z.files}
        meta = json.loads(str(u["meta"]))
    except Exception as e:  # a torn or foreign file
        raise OcrError(f"{path}: not a readable OCR unit ({type(e).__name__}: {e}); remove it and run "
                       f"`{ocr_command(root)}` again (it redoes that unit only)") from None
    if meta.get("shard") != expect_shard:
        raise OcrError(f"{path}: made from another repack (its shard {meta.get('shard', '?').split(':')[0]} "
                       "had other records); this OCR directory does not belong to this DATA: run "
                       f"`{ocr_command(root)} --overwrite` to make it again")
    n = len(u.get("product_id", ()))
    if meta.get("start") != start or n != records:
        raise OcrError(f"{path}: holds {n} records from {meta.get('start')}, expected {records} from {start}; "
                       f"remove it and run `{ocr_command(root)}` again")
    return u


def unit_ranges(records: int) -> List[Tuple[int, int]]:
    return [(a, min(a + UNIT_RECORDS, records)) for a in range(0, records, UNIT_RECORDS)]


def require_manifest(root: str) -> str:
    """``root/ocr/manifest.json``, or an OcrError that gives the command making it (a cheap first check: the
    loader's ``open_ocr`` checks the rest)."""
    d = os.path.join(root, OCR_DIR)
    mpath = os.path.join(d, MANIFEST)
    if not os.path.isfile(mpath):
        what = "is unfinished (no manifest.json)" if os.path.isdir(d) else "does not exist"
        raise OcrError(f"{d} {what}: make it with `{ocr_command(root)}`")
    return mpath


def open_ocr(ds: Dataset, split: str) -> Dict[str, np.ndarray]:
    """The OCR of an image split in record order (the shards' order, as the manifest lists them):
    ``product_id``, ``image_index``, ``id_offsets`` (records + 1) and ``ids``. Refuses a missing, unfinished,
    corrupt or foreign OCR directory with one message that says what to run."""
    d = os.path.join(ds.root, OCR_DIR)
    mpath = require_manifest(ds.root)
    try:
        with open(mpath) as f:
            man = json.load(f)
    except ValueError as e:
        raise OcrError(f"{mpath}: unreadable ({e}); run `{ocr_command(ds.root)} --overwrite`") from None
    fp, per = repack_fingerprint(ds)
    if man.get("fingerprint") != fp:
        raise OcrError(f"{d} was made from another repack (fingerprint {man.get('fingerprint')}, this DATA's is "
                       f"{fp}: other shards, or the same pictures in another order); run "
                       f"`{ocr_command(ds.root)} --overwrite` to make it for this DATA")
    parts = {k: [] for k in ("product_id", "image_index", "lengths", "ids")}
    for info in ds.shard_infos(split):
        for a, z in unit_ranges(info["records"]):
            u = load_unit(unit_path(ds.root, split, info["path"], a), per[info["path"]], a, z - a, ds.root)
            parts["product_id"].append(u["product_id"])
            parts["image_index"].append(u["image_index"])
            parts["lengths"].append(np.diff(u["id_offsets"]))
            parts["ids"].append(u["ids"])
    cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    offsets = np.concatenate([[0], np.cumsum(cat.pop("lengths"))]).astype(np.int64)
    return {"product_id": cat["product_id"].astype(np.int64), "image_index": cat["image_index"].astype(np.int64),
            "id_offsets": offsets, "ids": cat["ids"].astype(np.int64), "hashing": man["hashing"],
            "settings": {k: man.get("settings", {}).get(k) for k in READ_SETTINGS}}


class TextLookup:
    """The text-branch input of a batch, looked up by the loader's ``(product_id, image_index)``: the ids of
    every picture in one flat array with the start of each picture's ids (``torch.nn.EmbeddingBag``'s
    ``input, offsets``). ``image_index`` -1 (a tiled product record) joins the text of all its pictures."""

    def __init__(self, *parts: Dict[str, np.ndarray]):
        pid = np.concatenate([p["product_id"] for p in parts])
        idx = np.concatenate([p["image_index"] for p in parts])
        if len(idx) and (idx.min() < 0 or idx.max() > 255):
            raise OcrError(f"image_index {int(idx.max())} is out of 0..255; re-run tools.ocr")
        lo = np.concatenate([p["id_offsets"][:-1] + sum(len(q["ids"]) for q in parts[:k])
                             for k, p in enumerate(parts)])
        hi = np.concatenate([p["id_offsets"][1:] + sum(len(q["ids"]) for q in parts[:k])
                             for k, p in enumerate(parts)])
        keys = (pid << 8) | idx
        order = np.argsort(keys, kind="stable")
        self.keys, self.lo, self.hi = keys[order], lo[order], hi[order]
        self.ids = np.concatenate([p["ids"] for p in parts]).astype(np.int64)

    def batch(self, product_id: np.ndarray, image_index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        product_id, image_index = np.asarray(product_id, np.int64), np.asarray(image_index, np.int64)
        whole = image_index < 0
        start = np.searchsorted(self.keys, (product_id << 8) | np.where(whole, 0, image_index))
        stop = np.where(whole, np.searchsorted(self.keys, (product_id + 1) << 8), start + 1)
        found = (start < len(self.keys)) & (stop > start)
        found[found] &= (self.keys[start[found]] >> 8) == product_id[found]
        found[found & ~whole] &= self.keys[start[found & ~whole]] == ((product_id << 8) | image_index)[found & ~whole]
        if not found.all():
            k = int(np.flatnonzero(~found)[0])
            raise OcrError(f"product {int(product_id[k])} image {int(image_index[k])} has no OCR entry: the OCR "
                           "directory is not of this DATA; run tools.ocr --data DATA --overwrite")
        pieces = [self.ids[a:b] for s, e in zip(start.tolist(), stop.tolist())
                  for a, b in zip(self.lo[s:e].tolist(), self.hi[s:e].tolist())]
        per = [int((self.hi[s:e] - self.lo[s:e]).sum()) for s, e in zip(start.tolist(), stop.tolist())]
        offsets = np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64) if per else np.zeros(0, np.int64)
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), offsets
