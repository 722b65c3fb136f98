"""Offline prediction: an unlabelled DATA directory + checkpoints -> one row per product ``_id``.

A test BSON goes through the same repack as training data first (``tools.predict --bson``, into a work
directory deleted afterwards), so every bad image is caught and listed the same way, and the shards are read
by the same DALI eval pipeline. This side only reads DATA: it imports nothing of ``dali_pipes.writer``.

The models run on ``--device`` (cuda where there is one), whatever the decode backend: a dali-cpu batch goes
to the GPU through the loader, as training's does.

Per batch, on the device and without a Python step per image: one forward pass per model (flip TTA puts
both views in that one pass), probabilities weighted over views and models, then summed per product with
``index_add_`` over the batch's product ids. The loader yields images in file order, so a product's
images are contiguous: every product but the batch's last is finished, and the last one (possibly cut by
the batch's end) is carried into the next batch. Tiled models score their products' tiled pictures from
their own loaders in the same order and are blended in per batch. The finished products' top classes (and
float16 probabilities with ``--probs``) come back in one device-to-host copy per batch, read one batch
later so that the copy overlaps the next batch's work. Memory does not grow with the file: one batch of
products in flight plus a few ints per product.

Duplicate lookup (``dedup``): a labelled repack stores a 64-bit hash of every image with its product and
category (``image_hashes.npy``); a test product whose readable images are all byte-identical to train
images gets the category those carry (the most frequent one when they disagree).
"""
from __future__ import annotations

import contextlib
import csv
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dali_pipes.config import DataConfig, drop_legacy_keys, resolve_amp, resolve_backend, tile_grid
from dali_pipes.dataset import check_class_map, open_dataset
from dali_pipes.fileio import Progress, atomic_path, atomic_write_text, csv_text
from dali_pipes.records import HASHES_FILE, MAX_K, OCR_DIR, PRODUCTS_FILE, QUARANTINE_FILE
from models import create_model, without_aux

from .checkpoint import CheckpointError, apply_input_norm, check_text, load as load_checkpoint
from .evaluate import product_runs


class PredictError(RuntimeError):
    pass


@dataclass
class Member:
    path: str
    weight: float
    model: torch.nn.Module
    config: dict
    category_ids: List[int]
    k: int = 0  # data.tiled_k it was trained with: the products it scores (KINDS)
    text_hashing: Optional[dict] = None  # a text branch's word hashing: it reads the OCR of the test pictures
    text_ocr: Optional[dict] = None  # ... read with these tools.ocr settings in training (det_size, angle_cls)


def parse_spec(spec: str) -> Tuple[str, float]:
    """``RUN/best.pt`` or ``RUN/best.pt:0.5`` -> (path, weight)."""
    path, _, w = spec.rpartition(":")
    if path and not os.path.exists(spec):
        try:
            return path, float(w)
        except ValueError:
            pass
    return spec, 1.0


DEVICES = ("cpu", "cuda")


def resolve_placement(backend: Optional[str], device: Optional[str]) -> Tuple[str, torch.device]:
    """The decode backend and the models' device (predict, clean, bench predict): two settings. The device
    defaults to cuda where torch sees one, whatever the backend; the backend to ``resolve_backend``'s default
    (dali-gpu with CUDA), but to dali-cpu with ``--device cpu``."""
    if device not in (None, *DEVICES):
        raise PredictError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: torch sees no CUDA device on this machine; pass --device cpu")
    backend = resolve_backend(backend or ("dali-cpu" if device == "cpu" else None))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "dali-gpu" and device == "cpu":
        raise PredictError("--backend dali-gpu decodes on the GPU and leaves the batches there; with --device cpu "
                           "pass --backend dali-cpu")
    return backend, torch.device(device)


# What a member scores, by the data.tiled_k it was trained with: the kinds of a product's blend. A kind's
# members are averaged by their weights, then the kinds that score a product by the kind weights (--weight).
KINDS = {
    "images": "every image of every product (data.tiled_k 0; --checkpoint)",
    "upsized": "the single-image products, as products/k1 holds them (data.tiled_k 1; --tiled 1=)",
    "tiled": "the products of K = 2, 3, 4 images, tiled into one picture (data.tiled_k K; --tiled K=)",
}


def kind_of(k: int) -> str:
    return "images" if k == 0 else "upsized" if k == 1 else "tiled"


def _what(k: int) -> str:
    if k == 0:
        return "single images (--checkpoint)"
    if k == 1:
        return "single-image products, upsized (--tiled 1=)"
    return f"tiled products of {k} images (--tiled {k}=)"


def load_member(spec: str, device: torch.device, tiled_k: int = 0) -> Member:
    """An ensemble member on ``device``; ``tiled_k``: the ``data.tiled_k`` its checkpoint must have been trained
    with (0: single images, for ``--checkpoint``; 1: single-image products, for ``--tiled 1=``; K for
    ``--tiled K=``)."""
    path, weight = parse_spec(spec)
    if not os.path.isfile(path):
        raise PredictError(f"{path}: no such checkpoint; pass RUN/best.pt of a finished training run")
    if weight <= 0:
        raise PredictError(f"{spec}: the weight of an ensemble member must be > 0")
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    got = int((cfg.get("data") or {}).get("tiled_k") or 0)
    if got != tiled_k:
        use = f"--tiled {got}={path}" if got else f"--checkpoint {path}"
        raise PredictError(f"{path}: trained with data.tiled_k {got}, but {_what(tiled_k)} need data.tiled_k "
                           f"{tiled_k}; pass it as {use}")
    text_hashing = ckpt.get("text_hashing") if cfg.get("model", {}).get("text_branch") else None
    try:
        text = {"buckets": int(text_hashing["buckets"]), "dim": int(cfg["model"]["text_dim"])} if text_hashing else None
        model = create_model(ckpt["model_name"], int(ckpt["num_classes"]), head=cfg["model"]["head"],
                             text_branch=text)
        model.load_state_dict(without_aux(ckpt["model"]))  # hierarchy heads, if any, play no part here
        apply_input_norm(ckpt, model)  # the normalization the weights were trained with
    except (KeyError, RuntimeError) as e:
        raise PredictError(f"{path}: not a checkpoint of train/run.sh, or its model does not match its "
                           f"config ({e})") from None
    model.eval().to(device)
    if cfg["model"].get("channels_last") and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return Member(path, weight, model, cfg, list(ckpt["category_ids"]), got, text_hashing,
                  ckpt.get("text_ocr") if text_hashing else None)


def load_ensemble(specs: List[str], device: torch.device, tiled: Sequence[Tuple[int, str]] = ()) -> List[Member]:
    """The ``--checkpoint`` members (single images), then the ``--tiled K=`` ones, all with the first one's
    class map. Members may differ in their picture settings: predict reads the pictures once per setting."""
    members = [load_member(s, device) for s in specs] + [load_member(s, device, k) for k, s in tiled]
    first = members[0]
    for m in members[1:]:
        if m.category_ids != first.category_ids:  # the training advice of check_class_map does not apply here
            diff = len(set(m.category_ids) ^ set(first.category_ids))
            raise PredictError(f"{m.path} vs {first.path}: class map differs ({len(m.category_ids)} vs "
                               f"{len(first.category_ids)} classes, {diff} category ids in one but not the other, "
                               "or a different order): every member of an ensemble must be trained on the same "
                               "classes.csv; leave that member out")
    return members


PICTURE_KEYS = ("image_size", "crop", "eval_crop")  # how a model's pictures are cut (with its K)


def picture_setting(m: Member) -> tuple:
    """The pictures a member reads: members with equal settings share one loader."""
    data = m.config["data"]
    return (m.k,) + tuple(data.get(key, getattr(DataConfig, key)) for key in PICTURE_KEYS)


def setting_name(setting: tuple) -> str:
    k, size, crop, eval_crop = setting
    return f"K={k} {size}/{crop if eval_crop else size}" if k else f"images {size}/{crop if eval_crop else size}"


def check_kind_weights(weights: Dict[str, float], members: List[Member]) -> Dict[str, float]:
    """``--weight KIND=W`` for the kinds of ``members``; every other kind weighs 1."""
    have = {kind_of(m.k) for m in members}
    for kind, w in weights.items():
        if kind not in KINDS:
            raise PredictError(f"--weight {kind}={w}: the kinds are {', '.join(KINDS)}")
        if kind not in have:
            raise PredictError(f"--weight {kind}={w}: no member of that kind ({KINDS[kind]}) in the ensemble")
        if not w > 0:
            raise PredictError(f"--weight {kind}={w}: a kind's weight must be > 0")
    return {kind: float(weights.get(kind, 1.0)) for kind in have}


@dataclass
class Rows:
    """The submission's rows in file order: products written to shards and products quarantined."""

    ids: np.ndarray  # product id per row
    written_rows: np.ndarray  # row of the n-th written product (shard order == file order)
    reasons: Dict[int, str] = field(default_factory=dict)  # row -> why it has no image prediction
    no_id: List[dict] = field(default_factory=list)  # quarantined documents without a readable id: no row
    # quarantined copies of an _id that has its row from another copy: (id, that row, reason); no second row
    repeated: List[Tuple[int, int, str]] = field(default_factory=list)


def read_rows(data: str) -> Rows:
    """One row per ``_id``, in file order: at the written copy where one was written (repack writes at most
    one), else at its first quarantined copy; documents without a readable ``_id`` get none."""
    with open(os.path.join(data, PRODUCTS_FILE), newline="") as f:
        written = [(int(r["offset"]), int(r["product_id"])) for r in csv.DictReader(f)]
    quarantined: Dict[int, Tuple[int, str]] = {}
    image_reasons: Dict[int, List[str]] = {}
    no_id = []
    with open(os.path.join(data, QUARANTINE_FILE), newline="") as f:
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
    has_written = {pid for _, pid in written}
    kept, others, seen = [], [], set()
    for e in entries:
        if e[2] is not None and (e[1] in has_written or e[1] in seen):
            others.append(e)
        else:
            seen.add(e[1])
            kept.append(e)
    row_of = {e[1]: i for i, e in enumerate(kept)}
    repeated = [(pid, row_of[pid], why) for _, pid, why in others]
    entries = kept
    ids = np.array([e[1] for e in entries], np.int64)
    written_rows = np.array([i for i, e in enumerate(entries) if e[2] is None], np.int64)
    reasons = {i: e[2] for i, e in enumerate(entries) if e[2] is not None}
    return Rows(ids, written_rows, reasons, no_id, repeated)


# ---- the per-batch pieces (tools.bench times them too) --------------------------------------------------
def make_loader(member: Member, data: str, backend: str, batch: int, threads: int, device: torch.device,
                k: int = 0, text: bool = False):
    """The eval loader of ``data``'s test split with ``member``'s data settings (K > 0: tiled products), its
    batches on ``device`` (from dali-cpu to a GPU: the loader's page-locked copy stream, as in training);
    ``text``: with the pictures' OCR input (``data``/ocr) for the members with a text branch."""
    from dali_pipes.loader import build_loader

    dc = DataConfig(**drop_legacy_keys(member.config["data"]))  # the model takes the pictures as they come
    dc.path, dc.backend, dc.batch_size, dc.tiled_k, dc.num_threads = data, backend, batch, k, threads
    return build_loader(dc, 0, 1, "test", device=device, text=text)[0]


def text_members(members: List[Member]) -> List[Member]:
    return [m for m in members if m.text_hashing is not None]


def check_text_hashing(members: List[Member], loader, data: str) -> None:
    """Each text member's word hashing against the OCR directory's (the loader's)."""
    for m in text_members(members):
        try:
            check_text(m.text_hashing, m.path, loader.text_hashing, os.path.join(data, OCR_DIR))
        except CheckpointError as e:
            raise PredictError(str(e)) from None


def double_text(text: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The OCR input of a batch followed by itself (the flip TTA's 2N pictures: a mirror has the same words)."""
    ids, offsets = text
    return torch.cat([ids, ids]), torch.cat([offsets, offsets + ids.shape[0]])


def inference_autocast(device: torch.device):
    """The autocast of predict and ``tools.clean``: bf16 on a GPU that computes it in hardware (the training
    policy, ``resolve_amp``: compute capability 8.0 on; an older GPU falls back to float32 with a note),
    float32 on the CPU (scoring there is for tests and small sets, where exact float32 values are worth more)."""
    amp = resolve_amp("bf16", device) if device.type == "cuda" else "off"
    if amp == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


def width_dim(images: torch.Tensor) -> int:
    """The W axis of a batch, NCHW or NHWC (a picture is never 3 pixels wide)."""
    return 2 if images.shape[-1] == 3 else 3


def mirror(images: torch.Tensor, tiled_k: int = 0) -> torch.Tensor:
    """The mirror view of a batch as training draws it: each picture mirrored, and in a tiled product each
    tile mirrored in its place (the strip's or grid's tile order kept); NCHW or NHWC."""
    w = width_dim(images)
    across = tile_grid(tiled_k)[1]  # tiles side by side along W
    if across == 1:
        return images.flip(w)
    return images.unflatten(w, (across, images.shape[w] // across)).flip(w + 1).flatten(w, w + 1)


class Scorer:
    """``scorer(images) -> (N, C) float32`` probabilities on the device: the weighted mean over the models
    and over the views (flip TTA: the images and their mirror images go through each model in one forward
    pass of 2N; if that runs out of GPU memory, two passes from then on). ``tiled_k``: the pictures are
    tiled products of K images, whose mirror view mirrors each tile in its place."""

    def __init__(self, members: List[Member], tta: str, device: torch.device, tiled_k: int = 0):
        if tta not in ("none", "flip"):
            raise PredictError(f"--tta must be none or flip, not {tta!r}")
        self.members, self.flip, self.device, self.tiled_k = members, tta == "flip", device, tiled_k
        self.scale = 1.0 / (sum(m.weight for m in members) * (2 if self.flip else 1))
        self.one_pass = True
        self.autocast = inference_autocast(device)

    def _probs(self, member: Member, x: torch.Tensor, text) -> torch.Tensor:
        kw = {"text": text} if member.text_hashing is not None else {}
        with self.autocast():
            logits = member.model(x, **kw)
        return logits.float().softmax(1)

    def _views(self, member: Member, x: torch.Tensor, text) -> torch.Tensor:
        """Probabilities summed over the views."""
        if not self.flip:
            return self._probs(member, x, text)
        n = x.shape[0]
        if self.one_pass:
            try:
                both = double_text(text) if text is not None else None
                q = self._probs(member, torch.cat([x, mirror(x, self.tiled_k)]), both)
                return q[:n] + q[n:]
            except torch.cuda.OutOfMemoryError:
                self.one_pass = False
                torch.cuda.empty_cache()
        return self._probs(member, x, text) + self._probs(member, mirror(x, self.tiled_k), text)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text=None) -> torch.Tensor:
        """``text``: the batch's OCR input (``meta["text"]``), for the members with a text branch."""
        x = images.to(self.device, non_blocking=True)
        if text is not None:
            text = tuple(t.to(self.device, non_blocking=True) for t in text)
        total = None
        for m in self.members:
            q = self._views(m, x, text).mul_(m.weight)
            total = q if total is None else total.add_(q)
        return total.mul_(self.scale)


class ProductSums:
    """Per-product means over a stream of (probabilities, product ids) batches in file order.

    ``add`` returns the products the batch finished, as ``(ids, image counts, means)`` with ids and counts
    on the host (numpy) and means on the device; the batch's last product stays open (its images may go on
    in the next batch) until ``finish``."""

    def __init__(self):
        self.open_id: Optional[int] = None
        self.open_sum: Optional[torch.Tensor] = None  # (1, C) on the device
        self.open_n = 0

    def add(self, probs: torch.Tensor, pids: torch.Tensor):
        ids, counts, _, sums = product_runs(pids, probs)
        if not len(ids):
            return ids, counts, sums
        if self.open_id is not None:
            if ids[0] == self.open_id:  # the product cut by the previous batch's end goes on here
                sums[:1] += self.open_sum
                counts[0] += self.open_n
            else:
                sums = torch.cat([self.open_sum, sums])
                ids = np.concatenate([[self.open_id], ids])
                counts = np.concatenate([[self.open_n], counts])
        self.open_id, self.open_sum, self.open_n = int(ids[-1]), sums[-1:], int(counts[-1])
        return ids[:-1], counts[:-1], _means(sums[:-1], counts[:-1])

    def finish(self):
        if self.open_id is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), None
        out = np.array([self.open_id]), np.array([self.open_n]), _means(self.open_sum, np.array([self.open_n]))
        self.open_id, self.open_sum, self.open_n = None, None, 0
        return out


def _means(sums: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    n = torch.from_numpy(counts.astype(np.float32)).to(sums.device, non_blocking=True)
    return sums / n[:, None]


class StageClock:
    """Model seconds of one picture setting without a sync per batch: on a GPU the device time between CUDA
    events, added up once at the end; on the CPU the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds, self.events = device.type == "cuda", 0.0, []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def total(self) -> float:
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.events) / 1000
            self.events = []
        return self.seconds


class Stream:
    """The probabilities of one picture setting's members per product, in file order: ``take(ids)`` reads on
    until it holds the products ``ids`` (the next ones this setting scores) and hands them out. ``k`` 0: every
    product, the mean over its images (``ProductSums``); ``k`` 1..4: the products of K images (4: four or more),
    one picture each."""

    def __init__(self, setting: tuple, members: List[Member], loader, tta: str, device: torch.device):
        self.setting, self.members, self.k = setting, members, setting[0]
        self.kind = kind_of(self.k)
        self.weight = sum(m.weight for m in members)  # within its kind, as its members' weights add up
        self.scorer = Scorer(members, tta, device, self.k)
        self.it = iter(loader) if loader is not None else iter(())
        self.sums = ProductSums() if self.k == 0 else None
        self.ended = False
        self.ids, self.counts, self.probs = np.zeros(0, np.int64), np.zeros(0, np.int64), None
        self.wait, self.batches, self.products = 0.0, 0, 0
        self.clock = StageClock(device)
        self.what = f"product shards k{self.k}" if self.k else "image shards"

    def read(self) -> bool:
        """One more batch into the buffer (at the end: the last open product); False when there is none."""
        if self.ended:
            return False
        t0 = time.perf_counter()
        try:
            images, _, meta = next(self.it)
        except StopIteration:
            self.ended = True
            if self.sums is None:
                return False
            ids, counts, probs = self.sums.finish()
        else:
            self.wait += time.perf_counter() - t0
            self.batches += 1
            with self.clock():
                p = self.scorer(images, meta.get("text"))
                pids = meta["product_id"]
                if self.sums is None:
                    ids, probs = pids.view(-1).numpy(), p
                    counts = np.full(len(ids), self.k, np.int64)
                else:
                    ids, counts, probs = self.sums.add(p, pids)
        if len(ids):
            self.ids, self.counts = np.concatenate([self.ids, ids]), np.concatenate([self.counts, counts])
            self.probs = probs if self.probs is None else torch.cat([self.probs, probs])
        return True

    def pop(self, m: int):
        """The first ``m`` buffered products: (ids, image counts, probabilities)."""
        out = self.ids[:m], self.counts[:m], self.probs[:m]
        self.ids, self.counts, self.probs = self.ids[m:], self.counts[m:], self.probs[m:]
        self.products += m
        return out

    def take(self, want: np.ndarray) -> torch.Tensor:
        while len(self.ids) < len(want):
            if not self.read():
                raise PredictError(f"{self.what} end before product {want[len(self.ids)]}; re-run the repack")
        m = len(want)
        if not np.array_equal(self.ids[:m], want):
            bad = int(want[np.flatnonzero(self.ids[:m] != want)[0]])
            raise PredictError(f"{self.what} out of step with the image shards at product {bad}; re-run the repack")
        return self.pop(m)[2]

    def report(self) -> dict:
        return {"setting": setting_name(self.setting), "kind": self.kind, "k": self.k,
                "models": len(self.members), "weight": self.weight, "products": self.products,
                "batches": self.batches, "data_wait_seconds": self.wait, "model_seconds": self.clock.total()}


def scores(k: int, counts: np.ndarray) -> np.ndarray:
    """Which of the products with these image counts a setting of K scores: all (K 0), else those of K images
    (K=4: four or more, as products/k4 holds them)."""
    return np.ones(len(counts), bool) if k == 0 else np.minimum(counts, MAX_K) == k


def blend(ids: np.ndarray, counts: np.ndarray, means: torch.Tensor, lead: Stream, streams: List[Stream],
          kind_weights: Dict[str, float]) -> torch.Tensor:
    """The products' probabilities: per kind, the weighted mean of the settings that score each product
    (``means``: ``lead``'s, already taken); then the mean over the kinds that score it, by ``kind_weights``.
    Index operations on the device: no step per product."""
    if len(streams) == 1:
        return means
    n, dev = len(ids), means.device
    per_kind: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for s in streams:
        rows = np.flatnonzero(scores(s.k, counts))
        if not len(rows):
            continue
        p = means if s is lead else s.take(ids[rows])
        num, den = per_kind.get(s.kind) or per_kind.setdefault(
            s.kind, (torch.zeros_like(means), torch.zeros(n, device=dev)))
        idx = torch.from_numpy(rows).to(dev, non_blocking=True)
        num.index_add_(0, idx, p * s.weight)
        den.index_add_(0, idx, torch.full((len(rows),), s.weight, device=dev))
    total, weight = torch.zeros_like(means), torch.zeros(n, device=dev)
    for kind, (num, den) in per_kind.items():
        w = (den > 0).float() * kind_weights[kind]
        total.add_(num / den.clamp_min(1e-12)[:, None] * w[:, None])
        weight.add_(w)
    return total / weight[:, None]


class Readback:
    """The finished products of a batch packed into one uint8 tensor (top-k class indices as int32, their
    probabilities as float32, and all probabilities as float16 when asked), copied to the host without
    blocking; ``result()`` waits for that copy only."""

    def __init__(self, means: torch.Tensor, topk: int, with_probs: bool):
        vals, idx = means.topk(topk, dim=1)
        parts = [idx.to(torch.int32), vals.contiguous()]
        if with_probs:
            parts.append(means.half())
        self.k, self.with_probs = topk, with_probs
        packed = torch.cat([p.contiguous().view(torch.uint8) for p in parts], 1)
        if packed.is_cuda:
            self.host = packed.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = packed, None

    def result(self):
        if self.event is not None:
            self.event.synchronize()
        a = self.host.numpy()
        k4 = 4 * self.k
        idx = np.ascontiguousarray(a[:, :k4]).view(np.int32)
        vals = np.ascontiguousarray(a[:, k4:2 * k4]).view(np.float32)
        probs = np.ascontiguousarray(a[:, 2 * k4:]).view(np.float16) if self.with_probs else None
        return idx, vals, probs


def open_streams(members: List[Member], ds, data: str, tta: str, backend: str, batch: int, threads: int,
                 device: torch.device) -> List[Stream]:
    """One loader per distinct picture setting (``picture_setting``), in the members' order: the first
    member's setting (single images) leads. A K the test set has no products of gets no loader."""
    groups: Dict[tuple, List[Member]] = {}
    for m in members:
        groups.setdefault(picture_setting(m), []).append(m)
    streams = []
    for setting, group in groups.items():
        k = setting[0]
        empty = k and not ds.num_records("test", k)
        text = bool(text_members(group))
        loader = None if empty else make_loader(group[0], data, backend, batch, threads, device, k, text)
        if text and loader is not None:
            check_text_hashing(group, loader, data)
        streams.append(Stream(setting, group, loader, tta, device))
    return streams


# ---- predict ------------------------------------------------------------------------------------------
def predict(data: str, members: List[Member], out: str, *, probs_path: Optional[str] = None, **kw) -> dict:
    """Write the submission ``out``, its report, the top-k CSV and ``probs_path`` (an n x C float16 file, ~19 GB
    for the real test set: written to a temporary beside it, removed on any failure or interrupt).
    ``device``: the models' (default: the members' own)."""
    with atomic_path(probs_path) if probs_path else contextlib.nullcontext() as probs_tmp:
        return _predict(data, members, out, probs_tmp=probs_tmp, **kw)


@torch.no_grad()
def _predict(data: str, members: List[Member], out: str, *, tta: str = "none",
             kind_weights: Optional[Dict[str, float]] = None, batch: int = 64, backend: str = "dali-cpu",
             device: Optional[torch.device] = None, threads: int = 2,
             probs_tmp: Optional[str] = None, topk: int = 1, fallback: Optional[int] = None,
             dedup: Optional[str] = None, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    device = device or next(members[0].model.parameters()).device
    ds = open_dataset(data)
    if "test" not in ds.manifest["splits"]:
        raise PredictError(f"{data}: not an unlabelled repack (no test split); repack test.bson with --unlabelled")
    cats = members[0].category_ids
    num_classes = len(cats)
    if topk < 1:
        raise PredictError(f"--topk must be >= 1, not {topk}")
    k = min(topk, num_classes)
    if fallback is not None and fallback not in cats:
        raise PredictError(f"--fallback {fallback} is not a category id of the checkpoints' class map")
    rows = read_rows(data)
    n = len(rows.ids)
    duplicates = find_duplicates(dedup, data, cats, rows) if dedup else {}

    kind_weights = check_kind_weights(kind_weights or {}, members)
    if members[0].k != 0:
        raise PredictError(f"{members[0].path}: the first member must be a single-image model (--checkpoint)")
    t0 = time.perf_counter()
    streams = open_streams(members, ds, data, tta, backend, batch, threads, device)
    lead = streams[0]
    build_s = time.perf_counter() - t0

    pred = np.full(n, -1, np.int64)
    probs_out = None
    if probs_tmp:
        probs_out = np.lib.format.open_memmap(probs_tmp, mode="w+", dtype=np.float16, shape=(n, num_classes))
    top_idx = np.zeros((n, k), np.int32) if topk > 1 else None
    top_val = np.zeros((n, k), np.float32) if topk > 1 else None
    bar = Progress("predict", len(rows.written_rows), "products", enabled=progress)
    state = {"done": 0}

    def store(ids: np.ndarray, rb: Readback) -> None:
        done = state["done"]
        if done + len(ids) > len(rows.written_rows):
            raise PredictError(f"{data}: the shards hold more products than products.csv (from product "
                               f"{ids[len(rows.written_rows) - done]}); re-run the repack")
        r = rows.written_rows[done:done + len(ids)]
        if not np.array_equal(rows.ids[r], ids):
            bad = int(ids[np.flatnonzero(rows.ids[r] != ids)[0]])
            raise PredictError(f"{data}: shards and products.csv disagree at product {bad} (or its images are "
                               "not contiguous in the shards); re-run the repack")
        idx, vals, probs = rb.result()
        pred[r] = idx[:, 0]
        if top_idx is not None:
            top_idx[r], top_val[r] = idx, vals
        if probs_out is not None:
            probs_out[r] = probs
        state["done"] = done + len(ids)
        bar.update(state["done"])

    pending = None
    t_loop = time.perf_counter()
    while lead.read():
        if not len(lead.ids):
            continue
        ids, counts, means = lead.pop(len(lead.ids))
        rb = (ids, Readback(blend(ids, counts, means, lead, streams, kind_weights), k, probs_out is not None))
        if pending is not None:  # the previous batch's copy overlapped this batch's work
            store(*pending)
        pending = rb
    if pending is not None:
        store(*pending)
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_s = time.perf_counter() - t_loop
    bar.update(state["done"], force=True)
    bar.finish()
    done = state["done"]
    if done != len(rows.written_rows):
        raise PredictError(f"{data}: {len(rows.written_rows) - done} products of products.csv were not in the shards")

    for row, (cat_index, _) in duplicates.items():
        pred[row] = cat_index
    # Products without a usable image get the fallback: --fallback, else the class predicted most often.
    if fallback is None:
        counts_all = np.bincount(pred[pred >= 0], minlength=num_classes)
        fb_index = int(counts_all.argmax()) if counts_all.sum() else 0
    else:
        fb_index = cats.index(fallback)
    for row in rows.reasons:
        pred[row] = fb_index
    cat_arr = np.asarray(cats, np.int64)
    atomic_write_text(out, csv_text(["_id", "category_id"], zip(rows.ids.tolist(), cat_arr[pred].tolist())))
    report_path = os.path.splitext(out)[0] + ".report.csv"
    why = {r: (w, int(cat_arr[fb_index])) for r, w in rows.reasons.items()}
    why.update({r: (w, int(cat_arr[c])) for r, (c, w) in duplicates.items()})
    report = [(int(rows.ids[r]), w, c) for r, (w, c) in sorted(why.items())]
    report += [(pid, f"{w}: no second row for this _id", int(cat_arr[pred[r]])) for pid, r, w in rows.repeated]
    report += [("", f"{r['reason']} (at offset {r['offset']}; no _id, so no row)", "") for r in rows.no_id]
    atomic_write_text(report_path, csv_text(["_id", "reason", "category_id_written"], report))
    if probs_out is not None:
        probs_out.flush()
        del probs_out  # closed; predict's atomic_path puts it in place
    if top_idx is not None:
        has = np.zeros(n, bool)
        has[rows.written_rows] = True
        header = ["_id"] + [f"category_id_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)]
        body = [[pid] + c + [f"{v:.5f}" for v in vs] for pid, c, vs in
                zip(rows.ids[has].tolist(), cat_arr[top_idx[has]].tolist(), top_val[has].tolist())]
        atomic_write_text(os.path.splitext(out)[0] + f".top{k}.csv", csv_text(header, body))
    images = ds.manifest["splits"]["test"]["images"]
    summary = {"products": n, "predicted": done, "fallback": len(rows.reasons), "no_id": len(rows.no_id),
               "repeated_id": len(rows.repeated),
               "duplicates": len(duplicates), "images": images, "seconds": time.perf_counter() - t_start,
               "loader_build_seconds": build_s, "loop_seconds": loop_s,
               "data_wait_share": sum(st.wait for st in streams) / max(loop_s, 1e-9),
               "flip_one_pass": all(st.scorer.one_pass for st in streams),
               "settings": [st.report() for st in streams], "kind_weights": kind_weights,
               "ocr": os.path.join(data, OCR_DIR) if text_members(members) else None,
               "report": report_path, "submission": out}
    return summary


# ---- duplicate lookup ---------------------------------------------------------------------------------
def read_hashes(data: str) -> np.ndarray:
    """``DATA/image_hashes.npy``: one row per written image (hash, product_id, category_id), sorted. Mapped,
    not read: the lookup touches the pages it needs, which stay reclaimable page cache (297 MB for the
    real train set's 12.4M images, 24 bytes each)."""
    path = os.path.join(data, HASHES_FILE)
    if not os.path.isfile(path):
        raise PredictError(f"{path} is missing: {data} was repacked before image hashes were recorded; re-run "
                           f"`python -m tools.repack ... --out {data} --overwrite`")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def find_duplicates(train_data: str, test_data: str, cats: List[int], rows: Rows) -> Dict[int, Tuple[int, str]]:
    """Rows of test products whose readable images all appear byte for byte in ``train_data`` ->
    (class index, reason). The category is the one most of the matching train images carry (ties: the
    lowest category id); the reason names the lowest train product id with that category."""
    ds = open_dataset(train_data)
    if not ds.labelled:
        raise PredictError(f"--dedup {train_data}: an unlabelled repack; pass the labelled train repack")
    check_class_map(cats, ds.category_ids, f"--dedup {train_data}/classes.csv vs the checkpoints")
    train, test = read_hashes(train_data), read_hashes(test_data)
    test = np.asarray(test)  # the test side is small; the train side stays mapped
    lo = np.searchsorted(train["hash"], test["hash"], "left")
    matches = np.searchsorted(train["hash"], test["hash"], "right") - lo
    # the test products with every image matched
    order = np.argsort(test["product_id"], kind="stable")
    pids, start, n_img = np.unique(test["product_id"][order], return_index=True, return_counts=True)
    if not len(pids):
        return {}
    n_hit = np.add.reduceat((matches[order] > 0).astype(np.int64), start)
    full = pids[n_hit == n_img]
    # every (test image, matching train image) pair of those products
    sel = np.flatnonzero(np.isin(test["product_id"], full))
    if not len(sel):
        return {}
    cnt = matches[sel]
    tj = np.repeat(lo[sel] - (np.cumsum(cnt) - cnt), cnt) + np.arange(cnt.sum())
    tp = np.repeat(test["product_id"][sel], cnt)
    cat, src = train["category_id"][tj], train["product_id"][tj]
    # votes per (test product, category); the winner per product: most votes, then the lowest category id
    keys, inv, votes = np.unique(np.stack([tp, cat]), axis=1, return_inverse=True, return_counts=True)
    first_src = np.full(keys.shape[1], np.iinfo(np.int64).max)
    np.minimum.at(first_src, inv.reshape(-1), src)
    rank = np.lexsort((keys[1], -votes, keys[0]))
    winners = rank[np.r_[True, keys[0][rank][1:] != keys[0][rank][:-1]]]
    pairs = np.unique(np.stack([tp, src]), axis=1)  # distinct (test product, train product)
    n_src = dict(zip(*(a.tolist() for a in np.unique(pairs[0], return_counts=True))))
    index = {c: i for i, c in enumerate(cats)}
    # the row of each winner's product: a sorted lookup over the written products, not a dict of all of them
    written_ids = rows.ids[rows.written_rows]
    by_id = np.argsort(written_ids, kind="stable")
    at = np.minimum(np.searchsorted(written_ids, keys[0][winners], sorter=by_id), max(len(by_id) - 1, 0))
    found = (written_ids[by_id[at]] == keys[0][winners]) if len(by_id) else np.zeros(len(winners), bool)
    row_of = {int(keys[0][w]): int(rows.written_rows[by_id[j]]) for w, j, ok in zip(winners, at, found) if ok}
    out: Dict[int, Tuple[int, str]] = {}
    for w in winners.tolist():
        p, c, s = int(keys[0][w]), int(keys[1][w]), int(first_src[w])
        if p not in row_of or c not in index:
            continue
        others = n_src[p] - 1
        reason = f"duplicate of train product {s}"
        if others > 0:
            reason += f" (its images are in {others} more train product(s); the most frequent category is used)"
        out[row_of[p]] = (index[c], reason)
    return out


def score(submission: str, answers: Dict[int, int], source: str) -> float:
    """Product-level accuracy of a submission against ``answers`` (_id -> category id, read from ``source``)."""
    with open(submission, newline="") as f:
        sub = {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(f)}
    missing = set(answers) - set(sub)
    if missing:
        raise PredictError(f"{submission} has no row for {len(missing)} products of {source} "
                           f"(e.g. {sorted(missing)[:3]})")
    return sum(sub[i] == c for i, c in answers.items()) / max(len(answers), 1)
