"""Repack on odd real-world pictures, written with Pillow here: trailers after the end-of-image marker,
decompression bombs (a small file whose header claims 16000x16000), corrupt scan data behind an intact
end marker. Nothing that decodes is dropped, nothing is lost: every product and image of the BSON is either
in the shards or in quarantine.csv, checked against what the test put into the BSON."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from dali_pipes.dataset import read_quarantine
from dali_pipes.records import read_examples
from dali_pipes.writer.jpeg_check import DEFAULT_MAX_SIDE, check_header
from dali_pipes.writer.repack import RepackError, repack
from tests.test_repack import CAT0, write_bson, write_cats


def picture(seed: int, width: int = 180, height: int = 180, quality: int = 75) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_trailer(jpeg: bytes, n: int = 100, seed: int = 0) -> bytes:
    """``n`` bytes after the end-of-image marker; none of them 0xFF, so no second marker hides in them."""
    return jpeg + np.random.default_rng(seed).integers(0, 0xFF, n, dtype=np.uint8).tobytes()


def claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The same file with its frame header (SOF0) claiming another size: an 11 kB 'bomb'."""
    sof = jpeg.index(b"\xff\xc0")
    out = bytearray(jpeg)
    out[sof + 5:sof + 7] = height.to_bytes(2, "big")
    out[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(out)


def corrupt_scan(jpeg: bytes) -> bytes:
    """Scan data scrambled, markers (header and end of image) intact."""
    sos = jpeg.index(b"\xff\xda")
    out = bytearray(jpeg)
    for i in range(sos + 40, len(jpeg) - 10, 7):
        out[i] = 0xFF if i % 2 else 0xD3
    return bytes(out)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def repack_docs(tmp_path, docs, name="D", **kw):
    src = write_bson(tmp_path / "in.bson", docs)
    cats = write_cats(tmp_path / "cats.csv", [CAT0])
    out = str(tmp_path / name)
    m = repack(src, out, categories=cats, val_fraction=0.0, progress=False, **kw)
    return out, m, read_quarantine(out)


def written_images(out, m):
    """{(product id, image index): image bytes} of every image record of every split."""
    got = {}
    for s in m["splits"].values():
        for sh in s["shards"]:
            for r in read_examples(os.path.join(out, sh["path"])):
                key = (r["product_id"], r["image_index"])
                assert key not in got
                got[key] = r["image"]
    return got


def test_trailer_after_end_of_image_is_kept_byte_for_byte(tmp_path):
    clean = picture(1)
    assert check_header(clean[:-2] + bytes(200)) is not None  # really no marker: still refused
    trailed = {
        0: with_trailer(clean, 100),  # padded upload
        1: with_trailer(clean, 5000, seed=1),  # phone data appended
        2: clean + b"\xff\xd8\xff\xe1" + with_trailer(b"", 300),  # a second (thumbnail-like) JPEG start
    }
    for pic in trailed.values():
        assert np.array_equal(decoded(pic), decoded(clean))  # what a decoder sees: the image, intact
    docs = [{"_id": 7, "category_id": CAT0, "imgs": [{"picture": trailed[j]} for j in range(3)]},
            {"_id": 8, "category_id": CAT0, "imgs": [{"picture": clean[:-2] + bytes(100)}]}]  # truncated, padded
    for verify in ("header", "decode"):
        out, m, q = repack_docs(tmp_path, docs, name=verify, verify=verify)
        got = written_images(out, m)
        assert got == {(7, j): trailed[j] for j in range(3)}, verify  # kept, not re-encoded, not trimmed
        assert [(r["product_id"], r["image_index"]) for r in q] == [("8", "0"), ("8", "")]
        assert "truncated JPEG" in q[0]["reason"]


def test_decompression_bomb_is_quarantined_with_its_own_reason(tmp_path):
    small = picture(2, quality=60)
    bomb = claiming(small, 16000, 16000)
    assert len(bomb) < 30_000  # small on disk, 768 MB once decoded
    wide = picture(3, width=200, height=100)
    docs = [{"_id": 1, "category_id": CAT0, "imgs": [{"picture": small}, {"picture": bomb}]},
            {"_id": 2, "category_id": CAT0, "imgs": [{"picture": bomb}]},  # the same header again: the memo
            {"_id": 3, "category_id": CAT0, "imgs": [{"picture": wide}]}]
    for verify in ("header", "decode"):
        out, m, q = repack_docs(tmp_path, docs, name=f"bomb_{verify}", verify=verify)
        assert set(written_images(out, m)) == {(1, 0), (3, 0)}
        rows = [(r["product_id"], r["image_index"]) for r in q]
        assert rows == [("1", "1"), ("2", "0"), ("2", "")]
        for r in q[:2]:
            assert f"16000x16000 pixels is larger than {DEFAULT_MAX_SIDE} pixels a side" in r["reason"]
            assert "--max-side" in r["reason"]
    # The limit is an option; the header memo of one run must not let a bomb through in the next.
    out, m, q = repack_docs(tmp_path, docs, name="loose", verify="header", max_side=16000)
    assert set(written_images(out, m)) == {(1, 0), (1, 1), (2, 0), (3, 0)} and q == []
    out, m, q = repack_docs(tmp_path, docs, name="tight", verify="header", max_side=199)
    assert set(written_images(out, m)) == {(1, 0)}  # 180 fits, 200x100 does not
    assert [(r["product_id"], r["image_index"]) for r in q if "pixels a side" in r["reason"]] == [
        ("1", "1"), ("2", "0"), ("3", "0")]
    assert m["settings"]["max_side"] == 199
    with pytest.raises(RepackError, match="--max-side"):
        repack_docs(tmp_path, docs, name="zero", max_side=0)


def test_max_side_on_the_command_line(tmp_path, capsys):
    from tools import repack as cli

    src = write_bson(tmp_path / "in.bson", [{"_id": 5, "category_id": CAT0, "imgs": [{"picture": picture(4)}]}])
    cats = write_cats(tmp_path / "cats.csv", [CAT0])
    assert cli.main(["--bson", src, "--categories", cats, "--out", str(tmp_path / "A"), "--quiet",
                     "--workers", "1", "--max-side", "179"]) == 0
    assert [r["image_index"] for r in read_quarantine(str(tmp_path / "A"))] == ["0", ""]
    assert cli.main(["--bson", src, "--categories", cats, "--out", str(tmp_path / "B"), "--quiet",
                     "--workers", "1", "--max-side", "180"]) == 0
    assert read_quarantine(str(tmp_path / "B")) == []


def test_corrupt_scan_data_is_caught_by_the_default_verify(tmp_path):
    good = picture(5, quality=90)
    bad = corrupt_scan(good)
    assert check_header(bad) is None  # the marker walk alone cannot see it
    docs = [{"_id": 9, "category_id": CAT0, "imgs": [{"picture": good}, {"picture": bad}]}]
    out, m, q = repack_docs(tmp_path, docs)  # no verify argument: the default
    assert m["settings"]["verify"] == "decode"
    assert set(written_images(out, m)) == {(9, 0)}
    assert [(r["product_id"], r["image_index"]) for r in q] == [("9", "1")]
    assert "does not decode" in q[0]["reason"]


@pytest.mark.parametrize("workers", [1, 2])
def test_nothing_is_lost_counts_from_the_bson_as_built(tmp_path, workers):
    """A BSON of known make-up: every image the test wrote is either in a shard (byte-identical) or in
    quarantine.csv with the expected reason; the manifest's counts equal what the test put in."""
    rng = np.random.default_rng(11)
    good, bad, docs = {}, {}, []
    kinds = ["clean", "trailer", "bomb", "corrupt", "truncated", "png"]
    for pid in range(1, 61):
        imgs = []
        for j in range(int(rng.integers(1, 5))):
            kind = kinds[int(rng.integers(0, len(kinds)))] if pid % 3 else "clean"
            base = picture(pid * 10 + j, quality=85)
            if kind == "clean":
                pic = base
            elif kind == "trailer":
                pic = with_trailer(base, 100, seed=pid)
            elif kind == "bomb":
                pic = claiming(base, 16000, 16000)
            elif kind == "corrupt":
                pic = corrupt_scan(base)
            elif kind == "truncated":
                pic = base[: len(base) // 2]
            else:
                buf = io.BytesIO()
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
                pic = buf.getvalue()
            (good if kind in ("clean", "trailer") else bad)[(pid, j)] = (kind, pic)
            imgs.append({"picture": pic})
        docs.append({"_id": pid, "category_id": CAT0, "imgs": imgs})
    n_images = sum(len(d["imgs"]) for d in docs)
    lost_products = {pid for pid in range(1, 61) if not any(k[0] == pid for k in good)}
    assert bad and lost_products and len(good) + len(bad) == n_images

    out, m, q = repack_docs(tmp_path, docs, verify="decode", workers=workers, shard_size_mb=0.05)
    assert written_images(out, m) == {k: pic for k, (_, pic) in good.items()}
    image_rows = {(int(r["product_id"]), int(r["image_index"])): r["reason"] for r in q if r["image_index"]}
    product_rows = {int(r["product_id"]) for r in q if not r["image_index"]}
    assert set(image_rows) == set(bad) and product_rows == lost_products
    expect = {"bomb": "pixels a side", "corrupt": "does not decode", "truncated": "truncated JPEG",
              "png": "not a JPEG (PNG image)"}
    for key, (kind, _) in bad.items():
        assert expect[kind] in image_rows[key], (key, kind, image_rows[key])
    c = m["counts"]
    assert (c["products_read"], c["products_written"], c["products_quarantined"]) == (
        60, 60 - len(lost_products), len(lost_products))
    assert (c["images_read"], c["images_written"], c["images_quarantined"]) == (n_images, len(good), len(bad))
