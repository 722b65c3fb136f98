"""Write a synthetic Cdiscount-format set: train.bson, test.bson, category_names.csv, test_answers.csv.

    python -m tools.make_synthetic --out DIR [--products N] [--test-products N] [--categories C] [--seed S]
        [--label-noise P] [--duplicates F] [--order shuffled|sorted] [--text-categories N]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="make_synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--products", type=int, default=2000, help="train products (default 2000)")
    ap.add_argument("--test-products", type=int, default=300, help="test products (default 300)")
    ap.add_argument("--categories", type=int, default=20, help="number of categories (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical files")
    ap.add_argument("--workers", type=int, default=1,
                    help="render processes (default 1; the output does not depend on it)")
    ap.add_argument("--quality", type=int, default=None, help="JPEG quality (default 88)")
    ap.add_argument("--label-noise", type=float, default=0.0, metavar="P",
                    help="give a share P of the train products a wrong category_id at random (their images "
                         "keep the true look), listed in train_label_noise.csv (default 0)")
    ap.add_argument("--duplicates", type=float, default=0.0, metavar="F",
                    help="give a share F of the test products the images of a train product of their category "
                         "(byte-identical copies), listed in test_duplicates.csv (default 0)")
    ap.add_argument("--order", choices=["shuffled", "sorted"], default="shuffled",
                    help="train.bson's document order: shuffled (as generated, default) or sorted by category_id, "
                         "as a catalogue export often is (the same documents)")
    ap.add_argument("--text-categories", type=int, default=0, metavar="N",
                    help="make the last N categories book covers of one look, told apart only by their printed "
                         "French titles (listed per picture in image_titles.csv; default 0)")
    args = ap.parse_args(argv)
    if args.products < 0 or args.test_products < 0:
        ap.error("product counts must be >= 0")
    if args.categories < 1:
        ap.error("--categories must be >= 1")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if not 0.0 <= args.label_noise <= 1.0:
        ap.error("--label-noise must be in [0, 1]")
    if not 0.0 <= args.duplicates <= 1.0:
        ap.error("--duplicates must be in [0, 1]")
    from tools.synthetic_text import MAX_TEXT_CATEGORIES

    if not 0 <= args.text_categories <= min(args.categories, MAX_TEXT_CATEGORIES):
        ap.error(f"--text-categories must be in [0, {min(args.categories, MAX_TEXT_CATEGORIES)}] (at most "
                 f"--categories and {MAX_TEXT_CATEGORIES})")

    from tools import synthetic

    kw = {} if args.quality is None else {"quality": args.quality}
    r = synthetic.make_dataset(args.out, products=args.products, test_products=args.test_products,
                               categories=args.categories, seed=args.seed, workers=args.workers,
                               label_noise=args.label_noise, duplicates=args.duplicates, order=args.order,
                               text_categories=args.text_categories, **kw)
    images = r["train_images"] + r["test_images"]
    print(f"wrote {os.path.abspath(args.out)}")
    for key in ("train_bson", "test_bson", "category_names", "test_answers", "label_noise", "duplicates", "titles"):
        if key in r:
            print(f"  {os.path.basename(r[key]):<22} {os.path.getsize(r[key]) / 1e6:9.2f} MB")
    if "label_noise" in r:
        print(f"label noise: {r['noisy_products']} train products relabelled at random "
              f"(listed in {os.path.basename(r['label_noise'])})")
    if "duplicates" in r:
        print(f"duplicates: {r['duplicate_products']} test products copy a train product's images "
              f"(listed in {os.path.basename(r['duplicates'])})")
    if "titles" in r:
        print(f"text categories: the last {args.text_categories} (LIBRAIRIE > LITTERATURE), told apart by their "
              f"titles (listed per picture in {os.path.basename(r['titles'])})")
    print(f"products: {r['train_products']} train, {r['test_products']} test; categories: {r['categories']}; "
          f"images: {images} (mean {r['mean_jpeg_bytes'] / 1e3:.2f} kB)")
    print(f"total {r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s "
          f"({images / max(r['seconds'], 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
