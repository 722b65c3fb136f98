"""Offline prediction: a test BSON (or an unlabelled DATA directory) + checkpoints -> one row per product.

The BSON goes through the same repack as training data (into a work directory, deleted afterwards), so
every bad image is caught and listed the same way, and the shards are read by the same DALI eval pipeline.
The eval loader yields images in file order, so a product's images arrive together: its probabilities are
averaged (over images, flips and the ensemble's models, by weight) and it is finished before the next one
starts. Memory does not grow with the file: one product in flight plus an int per product.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from dali_pipes.config import DataConfig
from dali_pipes.dataset import check_class_map, open_dataset
from dali_pipes.fileio import Progress, atomic_write_text, csv_text, temp_path_for
from dali_pipes.writer.repack import repack
from models import create_model

from .checkpoint import load as load_checkpoint


class PredictError(RuntimeError):
    pass


@dataclass
class Member:
    path: str
    weight: float
    model: torch.nn.Module
    config: dict
    category_ids: List[int]


def parse_spec(spec: str) -> Tuple[str, float]:
    """``RUN/best.pt`` or ``RUN/best.pt:0.5`` -> (path, weight)."""
    path, _, w = spec.rpartition(":")
    if path and not os.path.exists(spec):
        try:
            return path, float(w)
        except ValueError:
            pass
    return spec, 1.0


def load_member(spec: str, device: torch.device) -> Member:
    path, weight = parse_spec(spec)
    if not os.path.isfile(path):
        raise PredictError(f"{path}: no such checkpoint; pass RUN/best.pt of a finished training run")
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    try:
        model = create_model(ckpt["model_name"], int(ckpt["num_classes"]), head=cfg["model"]["head"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise PredictError(f"{path}: not a checkpoint of train/run.sh, or its model does not match its "
                           f"config ({e})") from None
    model.eval().to(device)
    if cfg["model"].get("channels_last") and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return Member(path, weight, model, cfg, list(ckpt["category_ids"]))


def load_ensemble(specs: List[str], device: torch.device) -> List[Member]:
    members = [load_member(s, device) for s in specs]
    for m in members[1:]:
        check_class_map(members[0].category_ids, m.category_ids, f"{m.path} vs {members[0].path}")
    return members


@dataclass
class Rows:
    """The submission's rows in file order: products written to shards and products quarantined."""

    ids: np.ndarray  # product id per row
    written_rows: np.ndarray  # row of the n-th written product (shard order == file order)
    reasons: Dict[int, str] = field(default_factory=dict)  # row -> why it has no image prediction
    no_id: List[dict] = field(default_factory=list)  # quarantined documents without an id: no row possible


def read_rows(data: str) -> Rows:
    with open(os.path.join(data, "products.csv"), newline="") as f:
        written = [(int(r["offset"]), int(r["product_id"])) for r in csv.DictReader(f)]
    quarantined: Dict[int, Tuple[int, str]] = {}
    image_reasons: Dict[int, List[str]] = {}
    no_id = []
    with open(os.path.join(data, "quarantine.csv"), newline="") as f:
        for r in csv.DictReader(f):
            if r["image_index"]:  # kept to explain the product's row if none of its images is readable
                image_reasons.setdefault(int(r["offset"]), []).append(f"image {r['image_index']}: {r['reason']}")
            elif not r["product_id"]:
                no_id.append(r)
            else:
                quarantined[int(r["offset"])] = (int(r["product_id"]), r["reason"])
    for off, (pid, why) in quarantined.items():
        if off in image_reasons:
            quarantined[off] = (pid, f"{why.split(' (')[0]}: {'; '.join(image_reasons[off])}")
    entries = [(o, pid, None) for o, pid in written] + [(o, pid, why) for o, (pid, why) in quarantined.items()]
    entries.sort(key=lambda e: e[0])
    ids = np.array([e[1] for e in entries], np.int64)
    written_rows = np.array([i for i, e in enumerate(entries) if e[2] is None], np.int64)
    reasons = {i: e[2] for i, e in enumerate(entries) if e[2] is not None}
    return Rows(ids, written_rows, reasons, no_id)


@torch.no_grad()
def predict(data: str, members: List[Member], out: str, *, tta: str = "none", tiled: Optional[Dict[int, str]] = None,
            batch: int = 64, backend: str = "dali-cpu", threads: int = 2, probs_path: Optional[str] = None,
            topk: int = 1, fallback: Optional[int] = None, labels_csv: Optional[str] = None,
            progress: bool = True) -> dict:
    from dali_pipes.loader import build_loader

    device = torch.device("cuda" if backend == "dali-gpu" else "cpu")
    ds = open_dataset(data)
    split = "test" if "test" in ds.manifest["splits"] else "val"
    if split != "test":
        raise PredictError(f"{data}: not an unlabelled repack (no test split); repack test.bson with --unlabelled")
    cats = members[0].category_ids
    num_classes = len(cats)
    rows = read_rows(data)
    n = len(rows.ids)

    def loader_for(member: Member, k: int = 0):
        dc = DataConfig(**member.config["data"])
        dc.path, dc.backend, dc.batch_size, dc.tiled_k = data, backend, batch, k
        dc.num_threads, dc.dtype, dc.channels_last = threads, "float32", False
        return build_loader(dc, 0, 1, split, device=device)[0]

    tiled_members = {k: load_member(p, device) for k, p in (tiled or {}).items()}
    for k, m in tiled_members.items():
        check_class_map(cats, m.category_ids, f"tiled K={k} model {m.path} vs {members[0].path}")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else (lambda: torch.autocast("cpu", enabled=False))
    n_views = 2 if tta == "flip" else 1

    def image_probs(model_list: List[Member], images: torch.Tensor) -> torch.Tensor:
        """Probabilities averaged over views (flip TTA) and models (by weight)."""
        images = images.to(device, non_blocking=True)
        p = None
        for m in model_list:
            views = (images, images.flip(3)) if tta == "flip" else (images,)
            for v in views:
                with autocast():
                    q = m.model(v).float().softmax(1) * m.weight
                p = q if p is None else p + q
        return p / (sum(m.weight for m in model_list) * n_views)

    tiled_iters = {k: _product_stream(loader_for(m, k), lambda x, m=m: image_probs([m], x))
                   for k, m in tiled_members.items()}
    pred = np.full(n, -1, np.int64)
    probs_out = None
    if probs_path:
        probs_tmp = temp_path_for(probs_path)
        probs_out = np.lib.format.open_memmap(probs_tmp, mode="w+", dtype=np.float16, shape=(n, num_classes))
    top_rows = [] if topk > 1 else None
    t0 = time.time()
    bar = Progress("predict", len(rows.written_rows), "products", enabled=progress)
    done = 0
    loader = loader_for(members[0])
    for pid, p, n_images in _product_stream(loader, lambda x: image_probs(members, x)):
        if done >= len(rows.written_rows) or rows.ids[rows.written_rows[done]] != pid:
            raise PredictError(f"{data}: shards and products.csv disagree at product {pid}; re-run the repack")
        if n_images in tiled_iters:
            tpid, tp, _ = next(tiled_iters[n_images])
            if tpid != pid:
                raise PredictError(f"{data}: product shards k{n_images} out of step at product {pid}")
            p = (p + tp) / 2
        row = rows.written_rows[done]
        pred[row] = int(p.argmax())
        if probs_out is not None:
            probs_out[row] = p.cpu().numpy().astype(np.float16)
        if top_rows is not None:
            v, i = p.topk(min(topk, num_classes))
            top_rows.append((row, i.tolist(), v.tolist()))
        done += 1
        bar.update(done, force=done == len(rows.written_rows))
    bar.finish()
    if done != len(rows.written_rows):
        raise PredictError(f"{data}: {len(rows.written_rows) - done} products of products.csv were not in the shards")

    # Products without a usable image get the fallback: --fallback, else the class predicted most often.
    if fallback is None:
        counts = np.bincount(pred[pred >= 0], minlength=num_classes)
        fb_index = int(counts.argmax()) if counts.sum() else 0
    else:
        if fallback not in cats:
            raise PredictError(f"--fallback {fallback} is not a category id of the checkpoints' class map")
        fb_index = cats.index(fallback)
    for row in rows.reasons:
        pred[row] = fb_index
    cat_arr = np.asarray(cats, np.int64)
    atomic_write_text(out, csv_text(["_id", "category_id"], zip(rows.ids.tolist(), cat_arr[pred].tolist())))
    report_path = os.path.splitext(out)[0] + ".report.csv"
    report = [(int(rows.ids[r]), why, int(cat_arr[fb_index])) for r, why in sorted(rows.reasons.items())]
    report += [("", f"{r['reason']} (at offset {r['offset']}; no _id, so no row)", "") for r in rows.no_id]
    atomic_write_text(report_path, csv_text(["_id", "reason", "category_id_written"], report))
    if probs_out is not None:
        probs_out.flush()
        del probs_out
        os.replace(probs_tmp, probs_path)
    if top_rows is not None:
        top_rows.sort()
        k = min(topk, num_classes)
        header = ["_id"] + [f"category_id_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)]
        body = [[int(rows.ids[r])] + [cats[j] for j in idx] + [f"{v:.5f}" for v in vals] for r, idx, vals in top_rows]
        atomic_write_text(os.path.splitext(out)[0] + f".top{k}.csv", csv_text(header, body))
    summary = {"products": n, "predicted": done, "fallback": len(rows.reasons), "no_id": len(rows.no_id),
               "seconds": time.time() - t0, "report": report_path, "submission": out}
    if labels_csv:
        summary["accuracy"] = score(out, labels_csv)
    return summary


def _product_stream(loader, probs_fn):
    """(product id, mean probability, images) per product, from a loader in file order."""
    cur, acc, count = None, None, 0
    finished = set()
    for images, _, meta in loader:
        p = probs_fn(images)
        pids = meta["product_id"].view(-1).tolist()
        for i, pid in enumerate(pids):
            if pid != cur:
                if cur is not None:
                    yield cur, acc / count, count
                    finished.add(cur)
                if pid in finished:
                    raise PredictError(f"product {pid}: its images are not contiguous in the shards")
                cur, acc, count = pid, p[i].clone(), 1
            else:
                acc += p[i]
                count += 1
    if cur is not None:
        yield cur, acc / count, count


def score(submission: str, answers: str) -> float:
    """Product-level accuracy of a submission against ``_id,category_id`` answers (CSV or labelled BSON)."""
    def read(path):
        if path.endswith(".bson"):  # a labelled BSON, e.g. a held-out part of train.bson
            from dali_pipes.writer.bson_io import iter_products

            return {d["_id"]: d["category_id"] for d in iter_products(path) if "category_id" in d}
        with open(path, newline="") as f:
            return {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(f)}

    sub, ans = read(submission), read(answers)
    missing = set(ans) - set(sub)
    if missing:
        raise PredictError(f"{submission} has no row for {len(missing)} products of {answers} "
                           f"(e.g. {sorted(missing)[:3]})")
    return sum(sub[i] == c for i, c in ans.items()) / max(len(ans), 1)


def repack_for_predict(bson_path: str, workdir: Optional[str], workers: int) -> Tuple[str, str]:
    """Unlabelled repack of a test BSON into a fresh work directory; returns (data dir, dir to delete)."""
    tmp = tempfile.mkdtemp(prefix="predict-", dir=workdir)
    data = os.path.join(tmp, "data")
    repack(bson_path, data, unlabelled=True, workers=workers, shard_size_mb=64, progress=False)
    return data, tmp


def cleanup(path: Optional[str]) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
