"""Repack: round trip, index files, every bad input of the data-layer issue, determinism, re-runs."""
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter

import bson
import numpy as np
import pytest
from PIL import Image

from dali_pipes.writer.bson_io import iter_products, read_document, scan_offsets
from dali_pipes.dataset import open_dataset, read_quarantine
from dali_pipes.records import IMAGE_FEATURES, dali_features, product_features, read_examples, read_index
from dali_pipes.writer.repack import RepackError, is_val, repack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAT0 = 1000010653


def jpeg(seed: int, quality: int = 60) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.full((180, 180, 3), 255, np.uint8)
    img[40:140, 50:130] = rng.integers(0, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((180, 180, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_cats(path, ids):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category_id", "category_level1", "category_level2", "category_level3"])
        for c in ids:
            w.writerow([c, "INFORMATIQUE", "ACCESSOIRE, CABLE", f"CAT {c}"])
    return str(path)


def good_docs(n, start=0):
    return [{"_id": start + i, "category_id": CAT0 + i % 3, "imgs": [{"picture": jpeg(start + i * 10 + j)}
                                                                     for j in range(1 + i % 4)]}
            for i in range(n)]


def write_bson(path, docs, raw_tail=b""):
    with open(path, "wb") as f:
        for d in docs:
            f.write(d if isinstance(d, bytes) else bson.encode(d))
        f.write(raw_tail)
    return str(path)


def run_repack(tmp_path, docs, name="D", **kw):
    src = write_bson(tmp_path / "in.bson", docs)
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    out = str(tmp_path / name)
    kw.setdefault("val_fraction", 0.2)
    m = repack(src, out, categories=cats, progress=False, **kw)
    return out, m, read_quarantine(out)


def splitmix64(x: int) -> int:
    """The published splitmix64 finalizer in Python integers (an implementation apart from repack's numpy one)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def in_val(product_id: int, fraction: float) -> bool:
    """DESIGN.md's rule: splitmix64 of the id below ``fraction`` of the 64-bit range means validation."""
    return splitmix64(product_id) < fraction * 2.0 ** 64


def n_images(docs):
    return sum(len(d["imgs"]) for d in docs)


def assert_counts(out, m, q, *, read, written, images_read, images_written, quarantined):
    """The manifest's counts and what the shards and quarantine.csv really hold, against the numbers the test
    built the BSON with. ``quarantined``: (product_id, image_index, part of the reason) per quarantine row."""
    assert m["counts"] == {"products_read": read, "products_written": written, "products_quarantined": read - written,
                           "images_read": images_read, "images_written": images_written,
                           "images_quarantined": images_read - images_written}
    recs = all_image_records(out, m)
    assert len(recs) == images_written and len({r["product_id"] for _, r in recs}) == written
    for split, s in m["splits"].items():
        in_split = [r for sp, r in recs if sp == split]
        assert (s["products"], s["images"]) == (len({r["product_id"] for r in in_split}), len(in_split))
    per_k = [r["product_id"] for k in range(1, 5) for split in m["splits"]
             for sh in m["products_k"][str(k)][split]["shards"] for r in read_examples(os.path.join(out, sh["path"]))]
    assert sorted(per_k) == sorted({r["product_id"] for _, r in recs})  # every written product once
    rows = sorted((r["product_id"], r["image_index"], r["reason"]) for r in q)
    want = sorted(quarantined)
    assert [r[:2] for r in rows] == [w[:2] for w in want], rows
    for r, w in zip(rows, want):
        assert w[2] in r[2], (r, w)


def all_image_records(out, m):
    recs = []
    for split, s in m["splits"].items():
        for sh in s["shards"]:
            recs += [(split, r) for r in read_examples(os.path.join(out, sh["path"]))]
    return recs


# ---- round trip on generated data -----------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    subprocess.run([sys.executable, "-m", "tools.make_synthetic", "--out", str(d), "--products", "300",
                    "--test-products", "40", "--categories", "6", "--seed", "3"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    out = d / "DATA"
    r = subprocess.run([sys.executable, "-m", "tools.repack", "--bson", str(d / "train.bson"), "--categories",
                        str(d / "category_names.csv"), "--out", str(out), "--val-fraction", "0.2",
                        "--workers", "2", "--shard-size-mb", "0.5", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "quarantined 0 products" in r.stdout
    return d, str(out)


def test_round_trip_own_reader(generated):
    d, out = generated
    ds = open_dataset(out)
    m = ds.manifest
    docs = list(iter_products(str(d / "train.bson")))
    val = [doc for doc in docs if in_val(doc["_id"], 0.2)]
    assert 0.1 < len(val) / len(docs) < 0.3
    assert_counts(out, m, read_quarantine(out), read=len(docs), written=len(docs), images_read=n_images(docs),
                  images_written=n_images(docs), quarantined=[])
    assert (m["splits"]["val"]["products"], m["splits"]["val"]["images"]) == (len(val), n_images(val))
    assert len(m["splits"]["train"]["shards"]) > 1  # several shards, written by 2 workers
    by_key = {(r["product_id"], r["image_index"]): (split, r) for split, r in all_image_records(out, m)}
    cats = ds.category_ids
    assert cats == sorted(cats)
    n_products = 0
    for doc in iter_products(str(d / "train.bson")):
        n_products += 1
        expected_split = "val" if in_val(doc["_id"], 0.2) else "train"
        for j, img in enumerate(doc["imgs"]):
            split, r = by_key.pop((doc["_id"], j))
            assert r["image"] == img["picture"]  # byte for byte, never re-encoded
            assert cats[r["label"]] == doc["category_id"]
            assert r["num_images"] == len(doc["imgs"])
            assert split == expected_split
    assert not by_key and n_products == m["counts"]["products_read"] == 300
    # Product shards: K images in the BSON's order, one record per product.
    seen = 0
    for k in range(1, 5):
        for split in ("train", "val"):
            for sh in m["products_k"][str(k)][split]["shards"]:
                for r in read_examples(os.path.join(out, sh["path"])):
                    doc = read_document(str(d / "train.bson"), _offset_of(d, r["product_id"]))
                    assert [r[f"image_{i}"] for i in range(k)] == [im["picture"] for im in doc["imgs"]]
                    seen += 1
    assert seen == 300


_OFFSETS = {}


def _offset_of(d, pid):
    if d not in _OFFSETS:
        idx = scan_offsets(str(d / "train.bson"))
        _OFFSETS[d] = dict(zip(idx.ids.tolist(), idx.offsets.tolist()))
    return _OFFSETS[d][pid]


def test_dali_reads_every_record_through_the_index(generated):
    from nvidia.dali import fn, pipeline_def

    d, out = generated
    ds = open_dataset(out)
    for split in ("train", "val"):
        paths, idxs, counts = ds.shards(split)
        assert sum(counts) == ds.manifest["splits"][split]["images"]
        for p, ip, n in zip(paths, idxs, counts):
            assert len(read_index(ip)) == n

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            r = fn.readers.tfrecord(path=paths, index_path=idxs, features=dali_features(IMAGE_FEATURES),
                                    name="R")
            return r["image"], r["product_id"], r["image_index"], r["label"]

        p = pipe()
        p.build()
        total = sum(counts)
        assert p.epoch_size("R") == total
        own = [(r["product_id"], r["image_index"], r["image"], r["label"])
               for pth in paths for r in read_examples(pth)]
        got = []
        for _ in range(total):
            img, pid, j, lab = p.run()
            got.append((int(pid.at(0)[0]), int(j.at(0)[0]), bytes(img.at(0)), int(lab.at(0)[0])))
        assert got == own


def test_dali_reads_product_shards(generated):
    from nvidia.dali import fn, pipeline_def

    _, out = generated
    ds = open_dataset(out)
    paths, idxs, counts = ds.shards("train", k=2)
    assert sum(counts) == ds.manifest["products_k"]["2"]["train"]["products"] > 0

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        r = fn.readers.tfrecord(path=paths, index_path=idxs, features=dali_features(product_features(2)), name="R")
        return fn.decoders.image(r["image_1"], device="cpu"), r["product_id"]

    p = pipe()
    p.build()
    img, _ = p.run()
    assert img.at(0).shape == (180, 180, 3)


def test_same_input_gives_identical_output_whatever_the_workers(generated, tmp_path, monkeypatch):
    """... and whatever the open-file budget of the shuffle's scatter (here one piece open at a time: each
    chunk is read once per train shard)."""
    from dali_pipes.writer import shuffle

    d, out = generated
    other = tmp_path / "again"
    monkeypatch.setattr(shuffle, "FILES_PER_PASS", 1)
    repack(str(d / "train.bson"), str(other), categories=str(d / "category_names.csv"), val_fraction=0.2,
           workers=1, shard_size_mb=0.5, progress=False)
    assert len(os.listdir(other / "train")) >= 4  # several buckets, so several passes per chunk

    def digest(root):
        files = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                data = open(p, "rb").read()
                if n == "manifest.json":
                    m = json.loads(data)
                    m.pop("created"), m.pop("seconds")
                    data = json.dumps(m, sort_keys=True).encode()
                files[os.path.relpath(p, root)] = hashlib.sha256(data).hexdigest()
        return files

    assert digest(out) == digest(str(other))


def test_unlabelled_keeps_product_ids_in_file_order(generated, tmp_path):
    d, _ = generated
    out = tmp_path / "T"
    r = subprocess.run([sys.executable, "-m", "tools.repack", "--bson", str(d / "test.bson"), "--unlabelled",
                        "--out", str(out), "--workers", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.load(open(out / "manifest.json"))
    ids = [doc["_id"] for doc in iter_products(str(d / "test.bson"))]
    with open(out / "products.csv") as f:
        assert [int(row["product_id"]) for row in csv.DictReader(f)] == ids
    recs = [r for sh in m["splits"]["test"]["shards"] for r in read_examples(str(out / sh["path"]))]
    assert sorted({r["product_id"] for r in recs}) == sorted(ids)
    assert {r["label"] for r in recs} == {-1}


# ---- bad input, nothing lost ----------------------------------------------------------------------
def cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.repack", *args, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)


def test_empty_file(tmp_path):
    src = write_bson(tmp_path / "train.bson", [])
    r = cli("--bson", src, "--categories", write_cats(tmp_path / "c.csv", [CAT0]), "--out", str(tmp_path / "D"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.bson is empty" in r.stderr and "fetch the file again" in r.stderr
    assert not os.path.exists(tmp_path / "D" / "manifest.json")


def test_not_bson(tmp_path):
    src = tmp_path / "train.bson"
    src.write_text("category_id,category_level1\n1000010653,ABONNEMENT\n" * 100)
    r = cli("--bson", str(src), "--categories", write_cats(tmp_path / "c.csv", [CAT0]), "--out", str(tmp_path / "D"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not look like a BSON dump" in r.stderr and "offset 0" in r.stderr


def test_truncated_in_the_middle_of_a_document(tmp_path):
    docs = [bson.encode(d) for d in good_docs(10)]
    src = write_bson(tmp_path / "in.bson", docs[:7], raw_tail=docs[7][: len(docs[7]) // 2])
    cut_at = sum(len(d) for d in docs[:7])
    r = cli("--bson", src, "--categories", write_cats(tmp_path / "c.csv", [CAT0, CAT0 + 1, CAT0 + 2]),
            "--out", str(tmp_path / "D"))
    assert r.returncode == 0, r.stderr
    assert f"could not be read past offset {cut_at:,}" in r.stdout
    m = json.load(open(tmp_path / "D" / "manifest.json"))
    assert m["counts"]["products_written"] == 7 and m["counts"]["products_read"] == 7
    assert m["incomplete_source"]["stop_offset"] == cut_at and "truncated" in m["incomplete_source"]["reason"]
    q = read_quarantine(str(tmp_path / "D"))
    assert q[-1]["offset"] == str(cut_at) and "unreadable from here" in q[-1]["reason"]
    whole = good_docs(10)[:7]
    assert_counts(str(tmp_path / "D"), m, q, read=7, written=7, images_read=n_images(whole),
                  images_written=n_images(whole), quarantined=[("", "", "unreadable from here")])


def test_product_without_images(tmp_path):
    docs = good_docs(4) + [{"_id": 99, "category_id": CAT0, "imgs": []}]
    out, m, q = run_repack(tmp_path, docs)
    assert [r["product_id"] for r in q] == ["99"] and q[0]["reason"] == "product has no images"
    assert m["counts"]["products_quarantined"] == 1 and m["counts"]["products_written"] == 4
    assert_counts(out, m, q, read=5, written=4, images_read=10, images_written=10,  # 1 + 2 + 3 + 4 images
                  quarantined=[("99", "", "product has no images")])


def test_product_without_category(tmp_path):
    docs = good_docs(4) + [{"_id": 77, "imgs": [{"picture": jpeg(1)}, {"picture": jpeg(2)}]}]
    out, m, q = run_repack(tmp_path, docs)
    assert q[0]["product_id"] == "77" and "no category_id" in q[0]["reason"] and "--unlabelled" in q[0]["reason"]
    assert m["counts"]["images_quarantined"] == 2
    assert_counts(out, m, q, read=5, written=4, images_read=12, images_written=10,
                  quarantined=[("77", "", "no category_id")])


def test_category_not_in_csv(tmp_path):
    docs = good_docs(4) + [{"_id": 55, "category_id": 1000099999, "imgs": [{"picture": jpeg(1)}]}]
    out, m, q = run_repack(tmp_path, docs)
    assert q[0]["product_id"] == "55" and "1000099999 is not in category_names.csv" in q[0]["reason"]
    assert_counts(out, m, q, read=5, written=4, images_read=11, images_written=10,
                  quarantined=[("55", "", "not in category_names.csv")])


def test_duplicate_id(tmp_path):
    docs = good_docs(4) + [{"_id": 2, "category_id": CAT0, "imgs": [{"picture": jpeg(5)}]}]
    out, m, q = run_repack(tmp_path, docs)
    assert len(q) == 1 and q[0]["product_id"] == "2" and "duplicate _id" in q[0]["reason"]
    first = scan_offsets(str(tmp_path / "in.bson")).offsets[2]
    assert f"the copy at offset {first} is kept" in q[0]["reason"]
    ids = [r["product_id"] for _, r in all_image_records(out, m)]
    assert ids.count(2) == 3  # the first product 2 (3 images) is kept, the duplicate is not
    assert_counts(out, m, q, read=5, written=4, images_read=11, images_written=10,
                  quarantined=[("2", "", "duplicate _id")])


def test_duplicate_id_first_usable_copy_is_written(tmp_path):
    # product 1's first copy has no images, its second is corrupt, its third is good, its fourth good too
    cut = jpeg(7)[:700]
    docs = good_docs(3) + [{"_id": 1, "category_id": CAT0, "imgs": [{"picture": cut}]},
                           {"_id": 1, "category_id": CAT0, "imgs": [{"picture": jpeg(8)}, {"picture": jpeg(9)}]},
                           {"_id": 1, "category_id": CAT0, "imgs": [{"picture": jpeg(5)}]}]
    docs[1] = {"_id": 1, "category_id": CAT0, "imgs": []}
    out, m, q = run_repack(tmp_path, docs, workers=2, shard_size_mb=0.001)  # each copy in a chunk of its own
    offs = scan_offsets(str(tmp_path / "in.bson")).offsets.tolist()
    kept = offs[4]
    recs = [r for _, r in all_image_records(out, m) if r["product_id"] == 1]
    assert sorted(r["image_index"] for r in recs) == [0, 1] and {r["num_images"] for r in recs} == {2}
    by_off = {int(r["offset"]): r["reason"] for r in q if r["image_index"] == ""}
    assert by_off[offs[1]] == f"product has no images (duplicate _id: the copy at offset {kept} is kept)"
    assert by_off[offs[3]].startswith("no readable image") and f"the copy at offset {kept} is kept" in by_off[offs[3]]
    assert by_off[offs[5]] == f"duplicate _id (the copy at offset {kept} is kept)"
    assert_counts(out, m, q, read=6, written=3, images_read=1 + 0 + 3 + 1 + 2 + 1, images_written=1 + 3 + 2,
                  quarantined=[("1", "", "product has no images"), ("1", "0", "truncated JPEG"), ("1", "", "no readable"),
                               ("1", "", "duplicate _id")])


def test_document_that_does_not_decode_keeps_its_leading_id(tmp_path):
    docs = [bson.encode(d) for d in good_docs(4)]
    bad = bytearray(docs[2])
    assert bad[5:9] == b"_id\x00" and bad[4] == 0x10  # int32 _id first: the offset scan reads it
    bad[13] = 0x7F  # the next element's type: the body does not decode
    docs[2] = bytes(bad)
    out, m, q = run_repack(tmp_path, docs)
    assert [(r["product_id"], r["image_index"]) for r in q] == [("2", "")] and "does not decode" in q[0]["reason"]
    assert_counts(out, m, q, read=4, written=3, images_read=1 + 2 + 4, images_written=7,
                  quarantined=[("2", "", "does not decode")])


def test_png_image_is_quarantined_product_kept(tmp_path):
    docs = good_docs(3) + [{"_id": 42, "category_id": CAT0, "imgs": [{"picture": jpeg(1)}, {"picture": png()}]}]
    out, m, q = run_repack(tmp_path, docs)
    assert [(r["product_id"], r["image_index"], r["reason"]) for r in q] == [("42", "1", "not a JPEG (PNG image)")]
    recs = [r for _, r in all_image_records(out, m) if r["product_id"] == 42]
    assert [(r["image_index"], r["num_images"]) for r in recs] == [(0, 1)]
    assert m["counts"]["images_quarantined"] == 1 and m["counts"]["products_quarantined"] == 0
    assert_counts(out, m, q, read=4, written=4, images_read=8, images_written=7,  # 1 + 2 + 3 + 2, one PNG
                  quarantined=[("42", "1", "not a JPEG")])


def test_truncated_jpeg_caught_by_header_check(tmp_path):
    bad = jpeg(3)[:900]
    docs = good_docs(3) + [{"_id": 43, "category_id": CAT0, "imgs": [{"picture": bad}]}]
    out, m, q = run_repack(tmp_path, docs)
    assert q[0]["image_index"] == "0" and "truncated JPEG" in q[0]["reason"]
    assert q[1]["product_id"] == "43" and q[1]["image_index"] == "" and "no readable image" in q[1]["reason"]
    assert m["counts"]["products_quarantined"] == 1 and m["counts"]["images_quarantined"] == 1
    assert_counts(out, m, q, read=4, written=3, images_read=7, images_written=6,
                  quarantined=[("43", "0", "truncated JPEG"), ("43", "", "no readable image")])


def test_corrupt_jpeg_data_caught_by_decode_check(tmp_path):
    good = jpeg(4, quality=90)
    sos = good.index(b"\xff\xda")
    bad = bytearray(good)
    for i in range(sos + 40, len(good) - 10, 7):  # scramble entropy data, keep the markers intact
        bad[i] = 0xFF if i % 2 else 0xD3
    bad = bytes(bad)
    docs = good_docs(3) + [{"_id": 44, "category_id": CAT0, "imgs": [{"picture": good}, {"picture": bad}]}]
    _, m_header, q_header = run_repack(tmp_path, docs, name="H", verify="header")
    assert q_header == []  # the marker walk cannot see damage inside the scan data
    _, m, q = run_repack(tmp_path, docs, name="V", verify="decode")
    assert [(r["product_id"], r["image_index"]) for r in q] == [("44", "1")]
    assert "does not decode" in q[0]["reason"]
    assert_counts(str(tmp_path / "V"), m, q, read=4, written=4, images_read=8, images_written=7,
                  quarantined=[("44", "1", "does not decode")])


def test_absurdly_large_document_and_image(tmp_path):
    big_doc = {"_id": 60, "category_id": CAT0, "imgs": [{"picture": jpeg(1)}], "junk": b"\x00" * (17 << 20)}
    big_img = jpeg(2) + b"\x00" * (5 << 20)
    docs = good_docs(2) + [big_doc, {"_id": 61, "category_id": CAT0, "imgs": [{"picture": big_img}]}] + good_docs(2, 100)
    out, m, q = run_repack(tmp_path, docs)
    reasons = {(r["product_id"], r["image_index"]): r["reason"] for r in q}
    assert "exceeds the 16777216-byte limit" in reasons[("60", "")]  # its leading _id was read by the scan
    assert "exceeds the 4194304-byte limit" in reasons[("61", "0")]
    assert m["counts"]["products_written"] == 4 and m["counts"]["products_quarantined"] == 2
    # the oversized document is never decoded, so its image is not among those read
    assert_counts(out, m, q, read=6, written=4, images_read=3 + 1 + 3, images_written=6,
                  quarantined=[("60", "", "16777216-byte limit"), ("61", "0", "4194304-byte limit"),
                               ("61", "", "no readable image")])


def test_corrupt_document_in_the_middle(tmp_path):
    docs = [bson.encode(d) for d in good_docs(5)]
    bad = bytearray(docs[2])
    bad[4] = 0x7F  # an invalid element type: the length prefix is fine, the content is not
    docs[2] = bytes(bad)
    out, m, q = run_repack(tmp_path, docs)
    assert len(q) == 1 and "does not decode" in q[0]["reason"] and q[0]["offset"] == str(len(docs[0]) + len(docs[1]))
    assert m["counts"]["products_written"] == 4
    # product 2 (3 images) does not decode: its images are not read
    assert_counts(out, m, q, read=5, written=4, images_read=11 - 3, images_written=8,
                  quarantined=[("", "", "does not decode")])


def test_missing_categories_file_and_bson(tmp_path):
    src = write_bson(tmp_path / "in.bson", good_docs(2))
    r = cli("--bson", src, "--categories", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "D"))
    assert r.returncode == 2 and "nope.csv: no such file" in r.stderr and "Traceback" not in r.stderr
    r = cli("--bson", str(tmp_path / "none.bson"), "--unlabelled", "--out", str(tmp_path / "D"))
    assert r.returncode == 2 and "none.bson: no such file" in r.stderr


def test_a_repack_into_a_directory_another_repack_is_writing_is_refused(tmp_path):
    """The marker is locked while a repack runs: a second one into the same --out, even with --overwrite,
    stops with a clear error and removes nothing; once the first is gone (ended or killed) it may go on."""
    import fcntl

    import dali_pipes.writer.repack as rp

    out, _, _ = run_repack(tmp_path, good_docs(4))
    fd = os.open(os.path.join(out, rp.REPACK_MARKER), os.O_RDWR | os.O_CREAT)
    os.write(fd, b"a repack of in.bson by pid 4321")
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the live repack holds it
    files = lambda: sorted(os.path.relpath(os.path.join(r, n), out) for r, _, ns in os.walk(out) for n in ns)
    before = files()
    with pytest.raises(RepackError, match="another repack is writing there now.*pid 4321"):
        run_repack(tmp_path, good_docs(5), overwrite=True)
    assert files() == before and "manifest.json" in before
    os.close(fd)  # that repack ended, or was killed: its lock went with it
    _, m, _ = run_repack(tmp_path, good_docs(5), overwrite=True)
    assert m["counts"]["products_written"] == 5 and not os.path.exists(os.path.join(out, rp.REPACK_MARKER))


def test_rerun_killed_run_starts_clean_and_existing_dataset_is_refused(tmp_path, monkeypatch):
    import dali_pipes.writer.repack as rp

    out, m, _ = run_repack(tmp_path, good_docs(6))
    assert not os.path.exists(os.path.join(out, rp.REPACK_MARKER))  # removed once the manifest is written
    # A finished dataset: refused without --overwrite.
    with pytest.raises(RepackError, match="--overwrite"):
        run_repack(tmp_path, good_docs(6))
    # A run interrupted just before its manifest: the marker stays, the temporaries do not.
    real = rp.atomic_write_text

    def interrupt_at_manifest(path, text):
        if path.endswith("manifest.json"):
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(rp, "atomic_write_text", interrupt_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        run_repack(tmp_path, good_docs(6), overwrite=True)
    monkeypatch.setattr(rp, "atomic_write_text", real)
    assert os.path.exists(os.path.join(out, rp.REPACK_MARKER))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # A run whose worker is stopped mid-shard without aborting its writers (a pool worker ended by SIGTERM):
    # the driver removes the shard temporaries it left.
    monkeypatch.setattr(rp._ChunkWriters, "abort", lambda self: None)
    monkeypatch.setattr(rp, "_count_sizes", lambda counter, sizes: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        run_repack(tmp_path, good_docs(6), overwrite=True)
    monkeypatch.undo()
    assert not [n for _, _, ns in os.walk(out) for n in ns if n.endswith(".tmp")]
    assert os.path.exists(os.path.join(out, rp.REPACK_MARKER))
    # Leftovers of the killed run (a stale shard, a temporary) beside files of the user's own.
    stale = os.path.join(out, "train", "train-00099.tfrecord")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    open(stale, "wb").write(b"junk")
    open(os.path.join(out, "train", ".train-00000.tfrecord.abc123.tmp"), "wb").write(b"junk")
    mine = [os.path.join(out, "notes.txt"), os.path.join(out, "train", "mine.tfrecord"),
            os.path.join(out, ".notes.txt.abc123.tmp")]
    for p in mine:
        open(p, "w").write("the user's")
    out2, m2, _ = run_repack(tmp_path, good_docs(4))
    assert not os.path.exists(stale)
    assert not any(n.endswith(".tmp") and "train-" in n for _, _, ns in os.walk(out2) for n in ns)
    assert m2["counts"]["products_written"] == 4 and all(os.path.isfile(p) for p in mine)
    out3, m3, _ = run_repack(tmp_path, good_docs(5), overwrite=True)
    assert m3["counts"]["products_written"] == 5 and all(os.path.isfile(p) for p in mine)
    assert {r["product_id"] for _, r in all_image_records(out3, m3)} == set(range(5))


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_empty_foreign_out_is_refused_and_left_alone(tmp_path, overwrite):
    src = write_bson(tmp_path / "in.bson", good_docs(3))
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    home = tmp_path / "home"  # `--out ~/cdiscount` where the user's own train/ folder and CSVs sit
    (home / "train").mkdir(parents=True)
    (home / "train" / "train-00000.tfrecord").write_text("the user's")
    (home / "quarantine.csv").write_text("the user's")
    (home / "run.tmp").write_text("the user's")
    before = sorted(str(p) for p in home.rglob("*"))
    r = cli("--bson", src, "--categories", cats, "--out", str(home), *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--out {home} is not empty (quarantine.csv, run.tmp, train)" in r.stderr and "another --out" in r.stderr
    assert sorted(str(p) for p in home.rglob("*")) == before
    assert (home / "train" / "train-00000.tfrecord").read_text() == "the user's"
    # an empty directory, or a new one, is fine
    (tmp_path / "empty").mkdir()
    assert cli("--bson", src, "--categories", cats, "--out", str(tmp_path / "empty")).returncode == 0


def test_product_with_more_than_four_images(tmp_path):
    six = [jpeg(700 + j) for j in range(6)]
    five = [jpeg(800), png(), jpeg(801), jpeg(802), jpeg(803)]  # 4 good images once the PNG is quarantined
    docs = good_docs(3) + [{"_id": 70, "category_id": CAT0, "imgs": [{"picture": p} for p in six]},
                           {"_id": 71, "category_id": CAT0 + 1, "imgs": [{"picture": p} for p in five]}]
    out, m, q = run_repack(tmp_path, docs)
    assert_counts(out, m, q, read=5, written=5, images_read=6 + 6 + 5, images_written=6 + 6 + 4,
                  quarantined=[("71", "1", "not a JPEG")])
    # image shards: every image of the product, each with its place in the document
    recs = {(r["product_id"], r["image_index"]): r for _, r in all_image_records(out, m) if r["product_id"] in (70, 71)}
    assert sorted(recs) == [(70, j) for j in range(6)] + [(71, j) for j in (0, 2, 3, 4)]
    assert [recs[70, j]["image"] for j in range(6)] == six and {recs[70, j]["num_images"] for j in range(6)} == {6}
    assert [recs[71, j]["image"] for j in (0, 2, 3, 4)] == [five[j] for j in (0, 2, 3, 4)]
    # product shards: K is at most 4, the first four good images in the document's order
    k4 = {r["product_id"]: r for split in ("train", "val") for sh in m["products_k"]["4"][split]["shards"]
          for r in read_examples(os.path.join(out, sh["path"]))}
    assert [k4[70][f"image_{i}"] for i in range(4)] == six[:4]
    assert [k4[71][f"image_{i}"] for i in range(4)] == [five[j] for j in (0, 2, 3, 4)]
    assert "image_4" not in k4[70] and sorted(m["products_k"]) == ["1", "2", "3", "4"]
    assert not os.path.exists(os.path.join(out, "products", "k5"))


def test_val_split_is_splitmix64_of_the_id():
    # splitmix64 seeded with 0: its first two outputs are the algorithm's published test values
    assert splitmix64(0) == 0xE220A8397B1DCDAF and splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert [i for i in range(100) if is_val(i, 0.1)] == [10, 18, 21, 41, 48, 68, 82, 83]
    ids = np.random.default_rng(0).integers(0, 1 << 62, 2000).tolist() + list(range(2000))
    for frac in (0.01, 0.1, 0.5):
        assert [is_val(i, frac) for i in ids] == [in_val(i, frac) for i in ids], frac
    assert 0.09 < sum(in_val(i, 0.1) for i in range(20000)) / 20000 < 0.11
    assert not any(is_val(i, 0.0) for i in range(1000))


# ---- picture sizes in the manifest ---------------------------------------------------------------------------
def sized_jpeg(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_manifest_records_the_picture_sizes_per_split(tmp_path):
    """Each split's "picture_sizes" counts its written pictures by frame size (width x height, as PIL reads
    them); quarantined pictures are not counted; one chunk per product, merged over two workers."""
    shapes = [(180, 180), (120, 90), (90, 120), (1, 1), (180, 180), (640, 480)]
    docs = [{"_id": i, "category_id": CAT0, "imgs": [{"picture": sized_jpeg(*shapes[(i + j) % len(shapes)], 10 * i + j)}
                                                   for j in range(1 + i % 3)]} for i in range(24)]
    docs[5]["imgs"].append({"picture": png()})  # quarantined: not in the counts
    want = {"train": {}, "val": {}}
    for d in docs:
        split = "val" if in_val(d["_id"], 0.3) else "train"
        for img in d["imgs"]:
            pic = Image.open(io.BytesIO(img["picture"]))
            if pic.format == "JPEG":
                key = f"{pic.size[0]}x{pic.size[1]}"
                want[split][key] = want[split].get(key, 0) + 1
    assert want["train"] and want["val"]
    out, m, q = run_repack(tmp_path, docs, val_fraction=0.3, workers=2, shard_size_mb=0.002)
    for split in ("train", "val"):
        got = m["splits"][split]["picture_sizes"]
        assert got == want[split] and sum(got.values()) == m["splits"][split]["images"], split
        counts = list(got.values())
        assert counts == sorted(counts, reverse=True)  # most common first
    assert open_dataset(out).picture_sizes("train") == want["train"]


def test_manifest_picture_sizes_are_bounded(tmp_path, monkeypatch):
    """Beyond PICTURE_SIZES distinct sizes the rarest are counted as "other", and a chunk keeps at most
    _CHUNK_SIZES of its own; the counts still add up to the split's pictures."""
    from dali_pipes.writer import repack as rp

    monkeypatch.setattr(rp, "PICTURE_SIZES", 2)
    monkeypatch.setattr(rp, "_CHUNK_SIZES", 3)
    # One chunk: its counter is full after 10x10, 20x10 and 30x10, so the four 40x10 count as other there;
    # of the rest the two most common (ties by size) are kept.
    shapes = [(10, 10), (20, 10), (30, 10)] + [(40, 10)] * 4 + [(10, 10)] * 2
    docs = [{"_id": i, "category_id": CAT0, "imgs": [{"picture": sized_jpeg(w, h, i)}]} for i, (w, h) in
            enumerate(shapes)]
    out, m, _ = run_repack(tmp_path, docs, val_fraction=0.0, workers=1)
    assert m["splits"]["train"]["picture_sizes"] == {"10x10": 3, "20x10": 1, "other": 5}
    assert rp.picture_sizes(Counter({(20, 20): 1, (9, 9): 2, "other": 4}), 1) == {"9x9": 2, "other": 5}


_SIGTERM_MID_REPACK = r"""
import os, signal, sys
import dali_pipes.writer.repack as rp
show = rp._show
def terminated(*a, **kw):  # the driver is told to stop while the pool's workers write their shards
    os.kill(os.getpid(), signal.SIGTERM)
    return show(*a, **kw)
rp._show = terminated
from tools import repack
sys.exit(repack.main(sys.argv[1:]))
"""


def test_sigterm_stops_every_worker_and_leaves_no_temporaries(tmp_path):
    src = write_bson(tmp_path / "in.bson", good_docs(40))
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    out = tmp_path / "D"
    r = subprocess.run([sys.executable, "-c", _SIGTERM_MID_REPACK, "--bson", src, "--categories", cats, "--out",
                        str(out), "--workers", "2", "--shard-size-mb", "0.01"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    assert r.stderr.strip() == "repack: interrupted (SIGTERM); its temporary files are removed", r.stderr[-2000:]
    assert not [n for _, _, ns in os.walk(out) for n in ns if n.endswith(".tmp")]
    assert os.path.exists(out / ".repack-unfinished") and not os.path.exists(out / "manifest.json")
    assert cli("--bson", src, "--categories", cats, "--out", str(out)).returncode == 0  # the re-run finishes it
