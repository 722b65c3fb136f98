"""Repack a Cdiscount BSON dump into indexed TFRecord shards.

    python -m tools.repack --bson train.bson --categories category_names.csv --out DATA [--workers N]
    python -m tools.repack --bson test.bson --unlabelled --out DATA_TEST
    python -m tools.repack ... --exclude excluded.csv     (leave out the images tools.clean listed)
"""
from __future__ import annotations

import argparse
import os
import sys

from dali_pipes.fileio import interruptible
from dali_pipes.writer.jpeg_check import DEFAULT_MAX_SIDE, DEFAULT_VERIFY, VERIFY_MODES
from dali_pipes.writer.repack import ORDERS, RepackError, repack


@interruptible("repack")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.repack", description=__doc__.split("\n")[0])
    ap.add_argument("--bson", required=True, help="train.bson (or test.bson with --unlabelled)")
    ap.add_argument("--categories", help="category_names.csv (required unless --unlabelled)")
    ap.add_argument("--out", required=True, help="output DATA directory")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of products for validation")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    ap.add_argument("--shard-size-mb", type=float, default=256, help="BSON bytes per shard (about)")
    ap.add_argument("--verify", choices=VERIFY_MODES, default=DEFAULT_VERIFY,
                    help="JPEG check: a full strict decode (decode, the default) or only the cheap marker walk "
                         "(header: about 3x faster, blind to corrupt scan data)")
    ap.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="PIXELS",
                    help="quarantine JPEGs whose header claims more pixels than this on a side "
                         "(decompression bombs; default %(default)s)")
    ap.add_argument("--unlabelled", action="store_true", help="no category_id expected (test.bson)")
    ap.add_argument("--exclude", metavar="CSV",
                    help="images to leave out (product_id,image_index[,reason]; what tools.clean writes); each "
                         "is listed in quarantine.csv")
    ap.add_argument("--order", choices=ORDERS, default="shuffle",
                    help="train records: shuffle (a seeded random order across all shards, the default: a file "
                         "sorted by category trains as well as a shuffled one) or file (the BSON's order)")
    ap.add_argument("--shuffle-seed", type=int, default=0, help="seed of --order shuffle (default %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing repacked DATA")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    try:
        m = repack(a.bson, a.out, categories=a.categories, val_fraction=a.val_fraction, workers=a.workers,
                   shard_size_mb=a.shard_size_mb, verify=a.verify, unlabelled=a.unlabelled,
                   overwrite=a.overwrite, max_side=a.max_side, progress=not a.quiet,
                   exclude=a.exclude, order=a.order, shuffle_seed=a.shuffle_seed)
    except RepackError as e:
        print(f"repack: error: {e}", file=sys.stderr)
        return 2
    c = m["counts"]
    splits = ", ".join(f"{s}: {v['products']:,} products / {v['images']:,} images" for s, v in m["splits"].items())
    print(f"repacked {a.bson} -> {a.out} in {m['seconds']:.1f}s\n  {splits}\n"
          f"  read {c['products_read']:,} products / {c['images_read']:,} images; "
          f"quarantined {c['products_quarantined']:,} products / {c['images_quarantined']:,} images "
          f"(see {os.path.join(a.out, 'quarantine.csv')})")
    if m.get("exclude"):
        x = m["exclude"]
        print(f"  excluded {x['images_excluded']:,} of the {x['listed']:,} images listed in {a.exclude}"
              + (f" ({x['not_matched']:,} not found in {a.bson} or already quarantined)" if x["not_matched"] else ""))
    if m["incomplete_source"]:
        s = m["incomplete_source"]
        print(f"  WARNING: {a.bson} could not be read past offset {s['stop_offset']:,} ({s['reason']}); "
              f"{s['unread_bytes']:,} bytes were not repacked. Re-download the file to get them.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
