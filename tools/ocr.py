"""Read the text on the repacked pictures (offline OCR) into DATA/ocr/, the input of the model's text branch.

    python -m tools.ocr --data DATA [--workers N] [--device cpu|cuda] [--det-size 192] [--overwrite]
    python -m tools.ocr --data DATA --show PRODUCT_ID        (the words read on a product's pictures)

A pretrained text detector (PP-OCRv4 det, a DBNet) finds the text boxes and a recognizer (PP-OCRv4 rec, a
CRNN-family model) reads them; both ship as ONNX files inside the ``rapidocr-onnxruntime`` 1.4.4 wheel, so
nothing is downloaded. Install: ``pip install -e '.[ocr]' && pip install --no-deps rapidocr-onnxruntime==1.4.4``
(README, "OCR"). The work goes in units of records (``dali_pipes.ocr_files``), each written atomically: after
a kill the same command keeps the finished units and does the rest. The manifest is written last.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dali_pipes.dataset import DatasetError, open_dataset
from dali_pipes.fileio import Progress, atomic_open, atomic_write_text, format_eta, interruptible
from dali_pipes.ocr_files import (HASHING, OCR_DIR, OCR_FORMAT_VERSION, OcrError, image_shards, load_unit,
                                  remove_ocr_files, repack_fingerprint, text_ids, unit_path, unit_ranges)
from dali_pipes.records import MANIFEST, decode_example, read_index

ENGINE_PACKAGE, ENGINE_VERSION = "rapidocr-onnxruntime", "1.4.4"
INSTALL = ("pip install -e '.[ocr]' && pip install --no-deps rapidocr-onnxruntime==1.4.4 (or `make install-ocr`; "
           "README, \"OCR\")")
DEFAULT_DET_SIZE = 192  # the package's 736 enlarges a 180-px picture 4x first: 5-7x the CPU, no better reading
DEFAULT_BATCH = 32  # pictures detected before their text boxes are recognized together
# Text boxes per recognizer call: a call pads its boxes to the widest, so on a CPU 16 cost 45% more CPU than
# 1 or 4 (BENCHMARKS.md, "OCR"); a GPU may want more (--rec-batch; not measured).
DEFAULT_REC_BATCH = 4


class OcrUnavailable(RuntimeError):
    """The OCR extra is not installed (or cannot run here); the message says what to install."""


def cuda_provider() -> bool:
    """Whether onnxruntime here can run on a GPU (onnxruntime-gpu's CUDA provider)."""
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def require_engine():
    """Import the OCR engine, or say what to install (or what to remove)."""
    from importlib import metadata

    def installed(dist: str) -> bool:
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            return False

    if installed("onnxruntime") and installed("onnxruntime-gpu"):  # one shadows the other's files
        raise OcrUnavailable("onnxruntime and onnxruntime-gpu are both installed; keep one: pip uninstall -y "
                             "onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or onnxruntime on a CPU)")
    try:
        import cv2  # noqa: F401
    except ImportError as e:
        if e.name != "cv2":  # cv2 is there but does not load: the GUI build without libGL
            raise OcrUnavailable(f"OpenCV does not load ({e}): pip uninstall -y opencv-python && pip install "
                                 "opencv-python-headless") from None
        raise OcrUnavailable(f"the OCR step needs the `ocr` extra (cv2 is missing): {INSTALL}") from None
    try:
        import onnxruntime  # noqa: F401
        import rapidocr_onnxruntime
    except ImportError as e:
        raise OcrUnavailable(f"the OCR step needs the `ocr` extra ({e.name or e} is missing): {INSTALL}") from None
    return rapidocr_onnxruntime


class Reader:
    """Detector + recognizer on one process, one ONNX thread each (parallelism comes from --workers)."""

    def __init__(self, det_size: int = DEFAULT_DET_SIZE, device: str = "cpu", angle_cls: bool = False,
                 threads: int = 1, rec_batch: int = DEFAULT_REC_BATCH):
        pkg = require_engine()
        import onnxruntime
        import yaml
        from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier
        from rapidocr_onnxruntime.ch_ppocr_det import TextDetector
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

        if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise OcrUnavailable("--device cuda needs onnxruntime's CUDA provider: pip uninstall -y onnxruntime && "
                                 "pip install onnxruntime-gpu (the two must not be installed together)")
        root = os.path.dirname(pkg.__file__)
        with open(os.path.join(root, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        for part in ("Det", "Rec", "Cls"):
            c = cfg[part]
            c["model_path"] = os.path.join(root, c["model_path"])
            if not os.path.isfile(c["model_path"]):  # never fetched: the wheel ships them
                raise OcrUnavailable(f"{c['model_path']} is missing from the installed package: {INSTALL}")
            c.update(intra_op_num_threads=threads, inter_op_num_threads=1, use_cuda=device == "cuda")
        cfg["Det"].update(limit_side_len=det_size, limit_type="min")
        cfg["Rec"]["rec_batch_num"] = rec_batch
        self.det, self.rec = TextDetector(cfg["Det"]), TextRecognizer(cfg["Rec"])
        self.cls = TextClassifier(cfg["Cls"]) if angle_cls else None
        self.models = {p: os.path.basename(cfg[p]["model_path"]) for p in ("Det", "Rec")}
        self.key = (det_size, device, angle_cls, threads, rec_batch)

    def read(self, images: Sequence[Optional[np.ndarray]]) -> List[Tuple[List[str], List[float]]]:
        """``(words, confidences)`` per picture (BGR uint8): detection per picture, then every text box of the
        batch recognized in batches; a picture without text (or None: not decodable) gives ``([], [])``."""
        crops, owner = [], []
        for i, img in enumerate(images):
            if img is None:
                continue
            boxes, _ = self.det(img)
            if boxes is None or not len(boxes):
                continue
            for box in sorted(boxes, key=lambda b: (round(float(b[0][1]) / 10), float(b[0][0]))):
                crops.append(_crop(img, box))
                owner.append(i)
        out: List[Tuple[List[str], List[float]]] = [([], []) for _ in images]
        if not crops:
            return out
        if self.cls is not None:
            crops, _, _ = self.cls(crops)
        lines, _ = self.rec(crops)
        for i, line in zip(owner, lines):
            text, score = line[0], float(line[1])
            for w in text.split():
                out[i][0].append(w)
                out[i][1].append(score)
        return out


def _crop(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The text box (4 corners, clockwise from top-left) warped upright to its own width and height."""
    import cv2

    box = box.astype(np.float32)
    w = int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3])))
    h = int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2])))
    w, h = max(w, 1), max(h, 1)
    m = cv2.getPerspectiveTransform(box, np.float32([[0, 0], [w, 0], [w, h], [0, h]]))
    crop = cv2.warpPerspective(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(crop) if h >= 1.5 * w else crop  # vertical text


def decode_bgr(jpeg: bytes) -> Optional[np.ndarray]:
    import cv2

    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)


def read_range(shard: str, index: str, start: int, stop: int) -> List[dict]:
    """The decoded Examples ``start..stop`` of a shard, found through its index."""
    spans = read_index(index)[start:stop]
    out = []
    with open(shard, "rb") as f:
        for off, size in spans:
            f.seek(off)
            frame = f.read(size)
            out.append(decode_example(frame[12:-4]))  # TFRecord frame: 12-byte header, payload, 4-byte CRC
    return out


# ---- one unit ----------------------------------------------------------------------------------------
_READER: Optional[Reader] = None
_BATCH = DEFAULT_BATCH
_TICK = None  # called with the pictures of each batch done (the progress line)


def _reader(settings: dict) -> Reader:
    """This process's reader for ``settings`` (made once)."""
    global _READER
    key = (settings["det_size"], settings["device"], settings["angle_cls"], 1, settings["rec_batch"])
    if _READER is None or _READER.key != key:
        _READER = Reader(*key)
    return _READER


def _init_worker(settings: dict, done) -> None:
    """A pool worker: its reader, and a progress counter shared with the parent."""
    global _BATCH, _TICK
    _reader(settings)
    _BATCH = settings["batch"]

    def tick(n: int) -> None:
        with done.get_lock():
            done.value += n
    _TICK = tick


def run_unit(job: tuple) -> Dict[str, int]:
    """OCR one unit and write its file atomically; returns its counts. ``settings`` (the ones that change
    the result) go into the file."""
    root, split, info, start, stop, shard_fp, settings = job
    recs = read_range(os.path.join(root, info["path"]), os.path.join(root, info["index"]), start, stop)
    words: List[str] = []
    scores: List[float] = []
    ids: List[int] = []
    woff, ioff = [0], [0]
    with_text = 0
    for a in range(0, len(recs), _BATCH):
        batch = recs[a:a + _BATCH]
        for w, s in _READER.read([decode_bgr(r["image"]) for r in batch]):
            words += w
            scores += s
            ids += text_ids(w, s, settings["hashing"])
            woff.append(len(words))
            ioff.append(len(ids))
            with_text += bool(w)
        if _TICK is not None:
            _TICK(len(batch))
    meta = {"shard": shard_fp, "start": start, "settings": settings}
    path = unit_path(root, split, info["path"], start)
    with atomic_open(path, "wb") as f:
        np.savez(f, product_id=np.array([r["product_id"] for r in recs], np.int64),
                 image_index=np.array([r["image_index"] for r in recs], np.int64),
                 word_offsets=np.array(woff, np.int64), words=np.array(words, dtype=str),
                 scores=np.array(scores, np.float32), id_offsets=np.array(ioff, np.int64),
                 ids=np.array(ids, np.int32), meta=np.array(json.dumps(meta)))
    return {"images": len(recs), "with_text": with_text, "words": len(words)}


# ---- the run ------------------------------------------------------------------------------------
def _prepare(root: str, overwrite: bool, fp: str, settings: dict, jobs: List[tuple]):
    """Remove DATA/ocr for --overwrite; else refuse one of another repack or other settings. Returns the
    jobs still to do and the counts of the finished ones."""
    d = os.path.join(root, OCR_DIR)
    if os.path.isdir(d):  # all of what tools.ocr wrote there for --overwrite, else killed workers' temporaries
        remove_ocr_files(d, temporaries_only=not overwrite)
    mpath = os.path.join(d, MANIFEST)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            man = json.load(f)
        if man.get("fingerprint") != fp:
            raise OcrError(f"{d} was made from another repack (fingerprint {man.get('fingerprint')}, this DATA's is "
                           f"{fp}); pass --overwrite to make it again for this DATA")
        os.remove(mpath)  # rewritten at the end, after the units are checked again
    todo, done = [], {"images": 0, "with_text": 0, "words": 0}
    for job in jobs:
        _, split, info, start, stop, shard_fp, _ = job
        path = unit_path(root, split, info["path"], start)
        if not os.path.isfile(path):
            todo.append(job)
            continue
        try:
            u = load_unit(path, shard_fp, start, stop - start, root)
        except OcrError as e:
            if "another repack" in str(e):
                raise
            os.remove(path)  # torn or unreadable: redo it
            todo.append(job)
            continue
        prev = json.loads(str(u["meta"]))["settings"]
        if prev != settings:
            changed = ", ".join(k for k in settings if prev.get(k) != settings[k])
            raise OcrError(f"{path} was made with other settings ({changed}); run with the settings it started "
                           "with, or pass --overwrite to start again")
        done["images"] += stop - start
        done["with_text"] += int(np.count_nonzero(np.diff(u["word_offsets"])))
        done["words"] += len(u["words"])
    return todo, done


def _project(jobs: List[tuple], settings: dict, workers: int) -> Tuple[float, float]:
    """Seconds per picture on one worker, measured on up to 16 pictures of the first unit to do, and the
    projected seconds for all the jobs."""
    root, _, info, start, stop, _, _ = jobs[0]
    recs = read_range(os.path.join(root, info["path"]), os.path.join(root, info["index"]), start,
                      min(stop, start + 16))
    imgs = [decode_bgr(r["image"]) for r in recs]
    reader = _reader(settings)
    reader.read(imgs[:1])  # warm-up
    t0 = time.perf_counter()
    reader.read(imgs)
    per = (time.perf_counter() - t0) / max(len(imgs), 1)
    total = sum(j[4] - j[3] for j in jobs)
    return per, per * total / max(workers, 1)


def run_ocr(data: str, workers: int = 1, device: str = "cpu", det_size: int = DEFAULT_DET_SIZE,
            batch: int = DEFAULT_BATCH, rec_batch: int = DEFAULT_REC_BATCH, angle_cls: bool = False,
            overwrite: bool = False,
            progress: bool = True, log=None) -> dict:
    """OCR every image split of the repack ``data`` into ``data/ocr``; returns the OCR manifest. The projected
    time goes to ``log`` (default stderr) before the work starts."""
    t0, log = time.time(), log or sys.stderr
    rapid = require_engine()
    ds = open_dataset(data)
    fp, per = repack_fingerprint(ds)
    settings = {"det_size": det_size, "device": device, "angle_cls": angle_cls, "batch": batch,
                "rec_batch": rec_batch, "hashing": HASHING}
    settings_key = {k: v for k, v in settings.items() if k not in ("device", "batch", "rec_batch")}  # speed only
    jobs = [(ds.root, split, info, a, z, per[info["path"]], settings_key)
            for split, info in image_shards(ds) for a, z in unit_ranges(info["records"])]
    todo, counts = _prepare(ds.root, overwrite, fp, settings_key, jobs)
    total = sum(z - a for _, _, _, a, z, _, _ in jobs)
    left = total - counts["images"]
    if todo:
        s_img, proj = _project(todo, settings, workers)
        print(f"ocr: {left:,} of {total:,} pictures to read ({counts['images']:,} done before), "
              f"{s_img * 1e3:.0f} ms a picture on one worker (measured on 16): projected {format_eta(proj)} "
              f"with {workers} worker(s), det size {det_size}, device {device}", file=log, flush=True)
    bar = Progress("ocr", total, "pictures", enabled=progress)
    done = mp.get_context("fork").Value("q", counts["images"])
    if workers > 1 and todo:
        with mp.get_context("fork").Pool(workers, _init_worker, (settings, done)) as pool:
            results = pool.imap_unordered(run_unit, todo)
            while True:  # wake up every 0.5 s for the progress line
                try:
                    r = results.next(timeout=0.5)
                except mp.TimeoutError:
                    bar.update(done.value, extra=f"{counts['with_text']:,} with text")
                    continue
                except StopIteration:
                    break
                for k in counts:
                    counts[k] += r[k]
    elif todo:
        _init_worker(settings, done)
        for j in todo:
            r = run_unit(j)
            for k in counts:
                counts[k] += r[k]
            bar.update(done.value, extra=f"{counts['with_text']:,} with text")
    bar.update(counts["images"], extra=f"{counts['with_text']:,} with text", force=True)
    bar.finish()
    man = {"format_version": OCR_FORMAT_VERSION, "fingerprint": fp, "hashing": HASHING,
           "settings": {k: v for k, v in settings.items() if k != "hashing"},
           "engine": {"package": ENGINE_PACKAGE, "version": getattr(rapid, "__version__", ENGINE_VERSION),
                      "models": _READER.models if _READER else None},
           "counts": {"images": counts["images"], "with_text": counts["with_text"], "words": counts["words"],
                      "units": len(jobs)},
           "splits": {s: ds.num_records(s) for s in ds.manifest["splits"]},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 3)}
    if counts["images"] != total:
        raise AssertionError(f"ocr lost track of pictures: {counts['images']} of {total}")  # a bug, not input
    os.makedirs(os.path.join(ds.root, OCR_DIR), exist_ok=True)
    atomic_write_text(os.path.join(ds.root, OCR_DIR, MANIFEST), json.dumps(man, indent=1) + "\n")
    return man


def show(data: str, product_id: int) -> List[Tuple[int, List[Tuple[str, float]]]]:
    """``(image_index, [(word, confidence), ...])`` of a product's pictures, from DATA/ocr."""
    ds = open_dataset(data)
    _, per = repack_fingerprint(ds)
    out = []
    for split, info in image_shards(ds):
        for a, z in unit_ranges(info["records"]):
            p = unit_path(ds.root, split, info["path"], a)
            if not os.path.isfile(p):
                continue
            u = load_unit(p, per[info["path"]], a, z - a, ds.root)
            for r in np.flatnonzero(u["product_id"] == product_id).tolist():
                lo, hi = u["word_offsets"][r], u["word_offsets"][r + 1]
                out.append((int(u["image_index"][r]),
                            [(str(w), round(float(s), 3)) for w, s in zip(u["words"][lo:hi], u["scores"][lo:hi])]))
    return sorted(out)


@interruptible("ocr")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.ocr", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a repacked DATA (or an unlabelled DATA_TEST)")
    ap.add_argument("--workers", type=int, default=1, help="processes, one ONNX thread each (default 1)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the detector and recognizer run (cuda: onnxruntime-gpu's provider)")
    ap.add_argument("--det-size", type=int, default=DEFAULT_DET_SIZE, metavar="PIXELS",
                    help="the detector's input: the shorter side is resized to this (the package's default is "
                         "736; default %(default)s for 180-px pictures)")
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="pictures whose text boxes are recognized "
                    "together (default %(default)s)")
    ap.add_argument("--rec-batch", type=int, default=DEFAULT_REC_BATCH, help="text boxes per recognizer call, "
                    "padded to the widest (default %(default)s: more costs CPU)")
    ap.add_argument("--angle-cls", action="store_true", help="turn text boxes read upside down (the package's "
                    "angle classifier; off by default: it costs time and covers are upright)")
    ap.add_argument("--overwrite", action="store_true", help="remove DATA/ocr and read everything again")
    ap.add_argument("--show", type=int, metavar="PRODUCT_ID", help="print the words read on a product's pictures")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    if a.workers < 1 or a.det_size < 32 or a.batch < 1 or a.rec_batch < 1:
        ap.error("--workers, --batch and --rec-batch must be >= 1, --det-size >= 32")
    try:
        if a.show is not None:
            rows = show(a.data, a.show)
            if not rows:
                print(f"ocr: product {a.show} is not in {a.data}/{OCR_DIR}", file=sys.stderr)
                return 1
            for j, words in rows:
                print(f"{a.show} image {j}: " + (" ".join(f"{w}({s:.2f})" for w, s in words) or "(no text)"))
            return 0
        m = run_ocr(a.data, workers=a.workers, device=a.device, det_size=a.det_size, batch=a.batch,
                    rec_batch=a.rec_batch, angle_cls=a.angle_cls, overwrite=a.overwrite, progress=not a.quiet)
    except (OcrUnavailable, DatasetError) as e:
        print(f"ocr: error: {e}", file=sys.stderr)
        return 2
    c = m["counts"]
    print(f"ocr: {c['images']:,} pictures of {a.data} read in {m['seconds']:.1f}s: {c['with_text']:,} with text, "
          f"{c['words']:,} words -> {os.path.join(a.data, OCR_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
