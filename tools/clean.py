"""Find likely mislabelled or useless train images: score each one's loss under a trained model, list the worst.

    python -m tools.clean --data DATA --checkpoint RUN/best.pt --drop-fraction 0.05 --out excluded.csv
    python -m tools.repack --bson train.bson --categories category_names.csv --out DATA_CLEAN --exclude excluded.csv

Every image of DATA's train split goes through the same DALI evaluation pipeline as validation (centre crop of
the checkpoint's ``data.crop``, file order); its loss is the cross-entropy of its label under the model's
probabilities averaged over the image and its mirror (``--tta flip``, the default). The ``--drop-fraction``
share of images with the highest loss is written to ``--out`` (worst first): ``product_id``, ``image_index``,
``category_id`` (the label), ``loss``, ``predicted_category_id`` and ``reason`` ("high loss under RUN"),
which ``tools.repack --exclude`` reads. ``--scores FILE`` also writes every image's score.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dali_pipes.fileio import interruptible

FIELDS = ["product_id", "image_index", "category_id", "loss", "predicted_category_id", "reason"]


class CleanError(RuntimeError):
    pass


@torch.no_grad()
def score_images(data: str, checkpoint: str, *, tta: str = "flip", batch: int = 128, backend: Optional[str] = None,
                 device: Optional[str] = None, threads: int = 2, split: str = "train", progress: bool = True) -> dict:
    """Loss of every image of ``split``: arrays ``product_id``, ``image_index``, ``label``, ``loss``, ``pred``
    (class indices), with ``category_ids`` (the class map)."""
    from dali_pipes.config import DataConfig, drop_legacy_keys
    from dali_pipes.dataset import check_class_map, open_dataset
    from dali_pipes.fileio import Progress
    from dali_pipes.loader import build_loader
    from dali_pipes.records import OCR_DIR
    from train.predict import check_text_hashing, inference_autocast, load_member, resolve_placement, width_dim

    if tta not in ("flip", "none"):
        raise CleanError(f"--tta must be flip or none, not {tta!r}")
    backend, device = resolve_placement(backend, device)  # the policy of predict: two settings
    member = load_member(checkpoint, device)  # a single-image model (data.tiled_k 0)
    ds = open_dataset(data)
    if not ds.labelled:
        raise CleanError(f"{data}: an unlabelled repack; clean needs the labelled train repack")
    check_class_map(member.category_ids, ds.category_ids, f"{checkpoint} vs {data}/classes.csv")
    dc = DataConfig(**drop_legacy_keys(member.config["data"]))  # the model takes the pictures as they come
    dc.path, dc.backend, dc.batch_size, dc.tiled_k, dc.num_threads = data, backend, batch, 0, threads
    text = member.text_hashing is not None  # a text branch reads the words tools.ocr found: DATA/ocr
    loader, _ = build_loader(dc, 0, 1, split, device=device, augment=False, text=text)
    if text:
        check_text_hashing([member], loader, data)
        print(f"clean: text branch: the words of {os.path.join(data, OCR_DIR)}", file=sys.stderr, flush=True)
    autocast = inference_autocast(device)
    n = loader.num_samples
    # One row per image in arrays sized once (28 bytes an image: 350 MB for the real 12.4M), not lists of
    # per-batch tensors concatenated and converted at the end (three copies).
    out = {"product_id": np.zeros(n, np.int64), "image_index": np.zeros(n, np.int32),
           "label": np.zeros(n, np.int32), "loss": np.zeros(n, np.float64), "pred": np.zeros(n, np.int32)}
    bar = Progress("clean", n, "images", enabled=progress)
    seen = 0
    for images, lab, meta in loader:
        images = images.to(device, non_blocking=True)
        lab = lab.to(device).view(-1).long()
        views = (images, images.flip(width_dim(images))) if tta == "flip" else (images,)
        kw = {"text": meta["text"]} if text else {}  # a mirror has the same words
        logp = []
        for v in views:
            with autocast():
                logp.append(F.log_softmax(member.model(v, **kw).float(), 1))
        # log of the mean probability over the views
        mean_logp = torch.logsumexp(torch.stack(logp), 0) - math.log(len(views))
        rows = slice(seen, seen + len(lab))
        if rows.stop > n:
            raise CleanError(f"{data}: the {split} shards hold more images than the manifest's {n}; re-run the repack")
        out["loss"][rows] = -mean_logp.gather(1, lab[:, None])[:, 0].cpu().numpy()
        out["pred"][rows] = mean_logp.argmax(1).cpu().numpy()
        out["label"][rows] = lab.cpu().numpy()
        out["product_id"][rows] = meta["product_id"].view(-1).cpu().numpy()
        out["image_index"][rows] = meta["image_index"].view(-1).cpu().numpy()
        seen = rows.stop
        bar.update(seen)
    bar.finish()
    if seen != n:
        raise CleanError(f"{data}: the {split} shards hold {seen} images, the manifest {n}; re-run the repack")
    out["category_ids"] = list(member.category_ids)
    return out


def worst(scores: dict, fraction: float) -> np.ndarray:
    """Row indices of the ``round(fraction * n)`` highest losses, worst first (ties: product id, image index)."""
    n = len(scores["loss"])
    k = int(round(fraction * n))
    order = np.lexsort((scores["image_index"], scores["product_id"], -scores["loss"]))
    return order[:k]


ROWS_BLOCK = 65536  # rows formatted at a time by write_rows


def write_rows(path: str, scores: dict, which, reason: str, fields: List[str] = FIELDS) -> None:
    """The rows ``which`` of ``scores`` (``rows_for``, the first ``len(fields)`` columns) to ``path`` as CSV,
    formatted a block at a time: the text of millions of rows never sits in memory at once."""
    from dali_pipes.fileio import atomic_csv

    with atomic_csv(path, fields) as out:
        for i in range(0, len(which), ROWS_BLOCK):
            out.write(r[:len(fields)] for r in rows_for(scores, which[i:i + ROWS_BLOCK], reason))


def run_name(checkpoint: str) -> str:
    """The run directory of ``RUN/best.pt`` (the checkpoint itself if it sits in the current directory)."""
    return os.path.dirname(os.path.normpath(checkpoint)) or checkpoint


def rows_for(scores: dict, which: np.ndarray, reason: str) -> List[list]:
    cats = np.asarray(scores["category_ids"], np.int64)
    return [[int(scores["product_id"][i]), int(scores["image_index"][i]), int(cats[scores["label"][i]]),
             f"{scores['loss'][i]:.6f}", int(cats[scores["pred"][i]]), reason] for i in which]


@interruptible("clean")
def main(argv=None) -> int:
    from dali_pipes.dataset import DatasetError
    from train.checkpoint import CheckpointError
    from train.predict import PredictError

    ap = argparse.ArgumentParser(prog="python -m tools.clean", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--data", required=True, help="the labelled DATA the model was trained on (tools.repack)")
    ap.add_argument("--checkpoint", required=True, help="RUN/best.pt of a training run on DATA")
    ap.add_argument("--drop-fraction", type=float, required=True, metavar="F",
                    help="share of the train images to list, highest loss first (e.g. 0.05)")
    ap.add_argument("--out", required=True, help="the exclude list to write (CSV)")
    ap.add_argument("--scores", help="also write every image's score here (CSV, file order)")
    ap.add_argument("--tta", choices=["flip", "none"], default="flip", help="average over the mirror (default)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--backend", choices=["dali-gpu", "dali-cpu"], help="default: dali-gpu where CUDA is, else dali-cpu (dali-gpu without CUDA falls back, with a note)")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="where the model runs, whatever the backend; default: "
                                                              "cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    if not 0.0 <= a.drop_fraction < 1.0:
        ap.error("--drop-fraction must be in [0, 1)")
    t0 = time.time()
    try:
        s = score_images(a.data, a.checkpoint, tta=a.tta, batch=a.batch, backend=a.backend, device=a.device,
                         threads=a.threads, progress=not a.quiet)
    except (CleanError, PredictError, CheckpointError, DatasetError, ValueError) as e:
        print(f"clean: error: {e}", file=sys.stderr)
        return 2
    reason = f"high loss under {run_name(a.checkpoint)}"
    which = worst(s, a.drop_fraction)
    n = len(s["loss"])
    write_rows(a.out, s, which, reason)
    if a.scores:
        write_rows(a.scores, s, range(n), "", FIELDS[:5])
    products = len(np.unique(s["product_id"][which]))
    wrong = float(np.mean(s["pred"] != s["label"])) if n else 0.0
    cut = f"; loss >= {s['loss'][which[-1]]:.3f}" if len(which) else ""
    print(f"scored {n:,} train images in {time.time() - t0:.1f}s (mean loss {s['loss'].mean() if n else 0:.3f}, "
          f"{wrong:.1%} predicted otherwise than labelled)\n"
          f"listed the worst {len(which):,} images ({products:,} products{cut}) in {a.out}; leave them out with "
          f"`python -m tools.repack ... --exclude {a.out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
