"""Opening a repacked DATA directory: the manifest, the class map and checked shard lists."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .records import MANIFEST


class DatasetError(RuntimeError):
    """A DATA directory that cannot be used as it is; the message says how to fix it."""


@dataclass
class Dataset:
    root: str
    manifest: dict
    category_ids: List[int]  # class index -> category id

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def labelled(self) -> bool:
        return bool(self.manifest["labelled"])

    def shard_infos(self, split: str, k: int = 0) -> List[dict]:
        """Shards of an image split (k=0) or of the product records with k images."""
        if k:
            by_split = self.manifest["products_k"].get(str(k))
            if by_split is None or split not in by_split:
                raise DatasetError(f"{self.root}: no product shards for K={k}, split {split!r}")
            return by_split[split]["shards"]
        if split not in self.manifest["splits"]:
            raise DatasetError(f"{self.root}: no split {split!r} (this dataset has "
                               f"{', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]["shards"]

    def shards(self, split: str, k: int = 0) -> Tuple[List[str], List[str], List[int]]:
        """``(tfrecord paths, index paths, record counts)``, each index checked against its shard."""
        infos = self.shard_infos(split, k)
        paths, idxs, counts = [], [], []
        for info in infos:
            p, ip = os.path.join(self.root, info["path"]), os.path.join(self.root, info["index"])
            check_index(p, ip, info["records"], info["bytes"])
            paths.append(p)
            idxs.append(ip)
            counts.append(info["records"])
        return paths, idxs, counts

    def num_records(self, split: str, k: int = 0) -> int:
        return sum(i["records"] for i in self.shard_infos(split, k))

    def picture_sizes(self, split: str) -> Optional[Dict[str, int]]:
        """``{"WxH": pictures, ..., "other": pictures}`` of the JPEG frames written to ``split`` (its product
        shards hold some of the same pictures), as the repack recorded them; None where it did not (a DATA
        directory from before the field)."""
        sizes = self.manifest.get("splits", {}).get(split, {}).get("picture_sizes")
        return dict(sizes) if isinstance(sizes, dict) else None

    def all_square(self, split: str, side: int) -> bool:
        """True when the manifest says that every picture of ``split`` is ``side`` x ``side``: after EXIF
        orientation it still is, so the loader needs no per-picture size check. False when some picture has
        another size, or the manifest does not say (or its sizes do not add up to the split's pictures)."""
        sizes = self.picture_sizes(split)
        if sizes is None or sum(sizes.values()) != self.manifest["splits"].get(split, {}).get("images"):
            return False
        return set(k for k, n in sizes.items() if n) <= {f"{side}x{side}"}


def check_index(path: str, idx_path: str, records: int, nbytes: int) -> None:
    """Refuse a missing shard, a missing index, or an index that does not describe its shard."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: shard listed in the manifest is missing; re-run tools.repack")
    if not os.path.isfile(idx_path):
        raise DatasetError(f"{idx_path}: index file missing for {os.path.basename(path)}; rebuild it with "
                           f"`tfrecord2idx {path} {idx_path}` or re-run tools.repack")
    size = os.path.getsize(path)
    if size != nbytes:
        raise DatasetError(f"{path}: shard is {size} bytes but the manifest says {nbytes}; the data changed "
                           "after repacking: re-run tools.repack")
    with open(idx_path, "rb") as f:
        lines = f.read().split(b"\n")
    lines = [ln for ln in lines if ln.strip()]
    last_end = 0
    if lines:
        off, n = lines[-1].split()
        last_end = int(off) + int(n)
    if len(lines) != records or last_end != size:
        raise DatasetError(f"{idx_path}: stale index ({len(lines)} entries ending at byte {last_end}, shard has "
                           f"{records} records and {size} bytes); rebuild it with "
                           f"`tfrecord2idx {path} {idx_path}` or re-run tools.repack")


def open_dataset(root: str) -> Dataset:
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such directory; make one with `python -m tools.repack --bson "
                           "train.bson --categories category_names.csv --out DATA`")
    mpath = os.path.join(root, MANIFEST)
    if not os.path.isfile(mpath):
        raise DatasetError(f"{root} has no {MANIFEST}: it is not a repacked dataset (or its repack did not "
                           "finish); run `python -m tools.repack ... --out " + root + "` again")
    with open(mpath) as f:
        manifest = json.load(f)
    cat_ids: List[int] = []
    cpath = os.path.join(root, "classes.csv")
    if os.path.isfile(cpath):
        with open(cpath, newline="") as f:
            rows = list(csv.DictReader(f))
        cat_ids = [int(r["category_id"]) for r in rows]
        if [int(r["index"]) for r in rows] != list(range(len(rows))):
            raise DatasetError(f"{cpath}: class indices are not 0..{len(rows) - 1} in order; re-run tools.repack")
    elif manifest.get("labelled"):
        raise DatasetError(f"{cpath} is missing; re-run tools.repack")
    if manifest.get("labelled") and len(cat_ids) != manifest.get("num_classes"):
        raise DatasetError(f"{cpath} lists {len(cat_ids)} classes, the manifest {manifest.get('num_classes')}; "
                           "re-run tools.repack")
    return Dataset(root, manifest, cat_ids)


def check_class_map(expected: List[int], actual: List[int], what: str) -> None:
    """Refuse to mix runs, checkpoints and data that number the categories differently."""
    if list(expected) != list(actual):
        diff = len(set(expected) ^ set(actual))
        raise DatasetError(f"{what}: class map differs ({len(expected)} vs {len(actual)} classes, {diff} category "
                           "ids in one but not the other, or a different order); use the DATA directory the "
                           "run started with, or start a new run with another --out")


def read_quarantine(root: str) -> List[Dict[str, str]]:
    with open(os.path.join(root, "quarantine.csv"), newline="") as f:
        return list(csv.DictReader(f))


LEVELS = (1, 2)  # the coarser levels of category_names.csv (level 3 is the category itself)


def class_levels(root: str, level: int) -> Tuple[List[str], List[int]]:
    """The class map of a coarser ``level`` of the category tree: ``(names, index)`` with ``index[c]`` the
    level class of class ``c``. A level-``k`` class is one path ``level1 > ... > levelk`` of classes.csv
    (category_names.csv's columns, kept by the repack), numbered in sorted order."""
    if level not in LEVELS:
        raise DatasetError(f"hierarchy level {level} does not exist: the levels are {', '.join(map(str, LEVELS))} "
                           "(category_level1, category_level2; level 3 is the category)")
    cpath = os.path.join(root, "classes.csv")
    if not os.path.isfile(cpath):
        raise DatasetError(f"{cpath} is missing: hierarchy heads need a labelled repack made with --categories")
    with open(cpath, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [f"category_level{i}" for i in range(1, level + 1)]
    missing = [c for c in cols if rows and c not in rows[0]]
    if missing:
        raise DatasetError(f"{cpath} has no column {', '.join(missing)}; re-run tools.repack with the "
                           "competition's category_names.csv")
    keys = [" > ".join(r[c].strip() for c in cols) for r in rows]
    names = sorted(set(keys))
    at = {k: i for i, k in enumerate(names)}
    return names, [at[k] for k in keys]
