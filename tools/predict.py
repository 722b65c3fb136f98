"""Predict a test set: test.bson (or an unlabelled repack) + checkpoints -> submission.csv.

    python -m tools.predict --bson test.bson --checkpoint RUN/best.pt [--checkpoint OTHER.pt:0.5 ...]
        [--tta none|flip] [--tiled 2=RUN_K2/best.pt ...] [--tiled 1=RUN_K1_224/best.pt[:W] ...]
        [--weight images=1 --weight tiled=1 --weight upsized=1] [--batch B] [--backend dali-gpu|dali-cpu]
        [--device cuda|cpu] --out submission.csv [--probs probs.npy] [--topk 5] [--labels test_answers.csv]
        [--dedup DATA]

A member with a text branch (``model.text_branch``) reads the words on the test pictures: with ``--data``
from ``DATA_TEST/ocr`` (``python -m tools.ocr --data DATA_TEST``); with ``--bson`` predict runs that OCR on its
temporary repack itself. The command line owns the ``--bson`` repack (``repack_for_predict``): ``train.predict`` reads DATA only.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from typing import Dict, Optional, Tuple

from dali_pipes.dataset import DatasetError
from dali_pipes.fileio import interruptible
from dali_pipes.writer.repack import RepackError, repack


def repack_for_predict(bson_path: str, workdir: Optional[str], workers: int) -> Tuple[str, str]:
    """Unlabelled repack of a test BSON into a fresh work directory; returns (data dir, dir to delete)."""
    tmp = tempfile.mkdtemp(prefix="predict-", dir=workdir)
    data = os.path.join(tmp, "data")
    try:
        repack(bson_path, data, unlabelled=True, workers=workers, shard_size_mb=64, progress=False)
    except BaseException:
        cleanup(tmp)
        raise
    return data, tmp


def read_text(data: str, members, device, workers: int, quiet: bool) -> None:
    """The OCR of a ``--bson`` repack (``tools.ocr``) where a member has a text branch, with the settings its
    training OCR used; its projected time and progress go to stderr."""
    if not members:
        return
    from tools.ocr import DEFAULT_DET_SIZE, cuda_provider, run_ocr

    used = members[0].text_ocr or {}
    det_size, angle_cls = used.get("det_size") or DEFAULT_DET_SIZE, bool(used.get("angle_cls"))
    on = "cuda" if device.type == "cuda" and cuda_provider() else "cpu"
    print(f"predict: {members[0].path} has a text branch: reading the text of the test pictures (tools.ocr, "
          f"det size {det_size}, {on})", file=sys.stderr, flush=True)
    run_ocr(data, workers=max(1, workers), device=on, det_size=det_size, angle_cls=angle_cls, progress=not quiet)


def cleanup(path: Optional[str]) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def read_answers(path: str) -> Dict[int, int]:
    """``--labels``: ``_id,category_id`` CSV, or a labelled BSON (e.g. a held-out part of train.bson)."""
    if path.endswith(".bson"):
        from dali_pipes.writer.bson_io import iter_products

        return {d["_id"]: d["category_id"] for d in iter_products(path) if "category_id" in d}
    with open(path, newline="") as f:
        return {int(r["_id"]): int(r["category_id"]) for r in csv.DictReader(f)}


def tiled_spec(spec: str):
    k, sep, path = spec.partition("=")
    if not sep or k not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"--tiled takes K=CHECKPOINT[:WEIGHT] with K in 1 (single-image products, "
                                         f"upsized), 2, 3, 4, not {spec!r}")
    return int(k), path


def kind_weight(spec: str):
    kind, _, w = spec.partition("=")
    try:
        return kind, float(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weight takes KIND=NUMBER (images, upsized, tiled), not {spec!r}")


@interruptible("predict")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bson", help="test.bson (streamed through an unlabelled repack into --workdir)")
    src.add_argument("--data", help="an unlabelled repack (tools.repack --unlabelled)")
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="RUN/best.pt, optionally PATH:WEIGHT; repeat for an ensemble")
    ap.add_argument("--tta", choices=["none", "flip"], default="none")
    ap.add_argument("--tiled", type=tiled_spec, action="append", default=[],
                    help="K=CHECKPOINT[:WEIGHT]: a model for the products with K images (data.tiled_k K: 2, 3, 4 "
                         "tiled; 1: the single-image products, e.g. finetune_k1_224); repeatable, also per K")
    ap.add_argument("--weight", type=kind_weight, action="append", default=[], metavar="KIND=W",
                    help="weight of a kind of member in a product's blend (images, upsized, tiled; default 1 "
                         "each): the kinds that score a product are averaged by these")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backend", choices=["dali-gpu", "dali-cpu"], default=None,
                    help="JPEG decoding; default: dali-gpu when CUDA is available (dali-cpu with --device cpu)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="where the models run, whatever the backend; default: cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI CPU threads")
    ap.add_argument("--out", required=True, help="submission CSV (_id,category_id)")
    ap.add_argument("--probs", help="also write the product probabilities (float16 .npy, rows as --out)")
    ap.add_argument("--topk", type=int, default=1, help="also write OUT.topK.csv with the K best classes")
    ap.add_argument("--fallback", type=int, help="category id for products without a readable image "
                                                 "(default: the class predicted most often)")
    ap.add_argument("--labels", help="answers (_id,category_id CSV, or a labelled .bson): print the "
                                     "product-level accuracy")
    ap.add_argument("--dedup", metavar="DATA", help="the labelled train repack: a test product whose images "
                    "are all byte-identical to train images gets their category (listed in the report)")
    ap.add_argument("--workdir", help="where --bson is repacked (default: the system temp dir)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    from train.predict import (PredictError, check_kind_weights, load_ensemble, predict, resolve_placement, score,
                               text_members)

    tmp = None
    try:
        backend, device = resolve_placement(a.backend, a.device)
        members = load_ensemble(a.checkpoint, device, a.tiled)
        check_kind_weights(dict(a.weight), members)  # before a --bson repack, which takes minutes
        data = a.data
        if a.bson:
            data, tmp = repack_for_predict(a.bson, a.workdir, workers=a.threads)
            read_text(data, text_members(members), device, a.threads, a.quiet)
        s = predict(data, members, a.out, tta=a.tta, kind_weights=dict(a.weight), batch=a.batch, backend=backend,
                    device=device, threads=a.threads, probs_path=a.probs, topk=a.topk, fallback=a.fallback,
                    dedup=a.dedup, progress=not a.quiet)
        if a.labels:
            s["accuracy"] = score(a.out, read_answers(a.labels), a.labels)
    except (PredictError, RepackError, DatasetError, RuntimeError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup(tmp)
    print(f"wrote {s['submission']}: {s['products']:,} products ({s['predicted']:,} predicted from images, "
          f"{s['fallback']:,} without a readable image -> fallback, listed in {s['report']}) "
          f"in {s['seconds']:.1f}s")
    if a.dedup:
        print(f"  {s['duplicates']:,} products are duplicates of train products and get their category "
              f"(listed in {s['report']})")
    if s["ocr"]:
        print(f"  text branch: the words of {s['ocr'] if a.data else 'the test pictures (tools.ocr, above)'}")
    print(f"  data wait {100 * s['data_wait_share']:.0f}% of the prediction loop")
    for st in s["settings"]:
        print(f"  {st['setting']:<14} {st['kind']:<7} {st['models']} model(s) weight {st['weight']:g}: "
              f"{st['products']:,} products, {st['batches']:,} batches, model {st['model_seconds']:.1f}s, "
              f"data wait {st['data_wait_seconds']:.1f}s")
    if s["no_id"]:
        print(f"  {s['no_id']} documents had no readable _id and get no row; see {s['report']}")
    if s["repeated_id"]:
        print(f"  {s['repeated_id']} documents repeat the _id of another copy, which has its row: no second row; "
              f"see {s['report']}")
    if "accuracy" in s:
        print(f"  product-level accuracy against {a.labels}: {s['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
