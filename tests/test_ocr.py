"""tools.ocr: real PP-OCRv4 (rapidocr-onnxruntime, the `ocr` extra) on generated book covers, its DATA/ocr
files, resuming, refusals; and what the project says when the extra is missing."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest

from dali_pipes import ocr_files
from dali_pipes.dataset import open_dataset
from dali_pipes.ocr_files import OcrError, normalize_word, open_ocr, text_ids
from dali_pipes.writer.repack import repack
from tools import ocr, synthetic, synthetic_text

try:
    import rapidocr_onnxruntime  # noqa: F401
    HAVE_ENGINE = True
except ImportError:
    HAVE_ENGINE = False
# `make test` installs the extra; elsewhere the tests that run the engine say why they did not run.
engine = pytest.mark.skipif(not HAVE_ENGINE, reason="the `ocr` extra is not installed (make install-ocr)")

UNIT = 8  # records per unit in these tests: several units per shard


@pytest.fixture(scope="module")
def text_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_raw")
    synthetic.make_dataset(str(out), products=24, test_products=6, categories=4, seed=3, text_categories=2)
    return out


def _repack(raw, out, **kw):
    repack(str(raw / "train.bson"), str(out), categories=str(raw / "category_names.csv"), progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def ocr_data(text_raw, tmp_path_factory):
    data = _repack(text_raw, tmp_path_factory.mktemp("ocr_data") / "DATA", val_fraction=0.2)
    mp = pytest.MonkeyPatch()
    mp.setattr(ocr_files, "UNIT_RECORDS", UNIT)
    ocr.run_ocr(str(data), progress=False)
    yield data
    mp.undo()


@pytest.fixture
def small_units(monkeypatch):
    monkeypatch.setattr(ocr_files, "UNIT_RECORDS", UNIT)


def _titles(raw):
    with open(raw / synthetic_text.TITLES_FILE, newline="") as f:
        return {(int(r["_id"]), int(r["image_index"])): r["title"] for r in csv.DictReader(f)}


def _read(data, split="train"):
    return open_ocr(open_dataset(str(data)), split)


@engine
def test_reads_the_printed_titles_and_nothing_elsewhere(ocr_data, text_raw, small_units):
    titles = _titles(text_raw)
    found = total = texty = 0
    for split in ("train", "val"):
        o = _read(ocr_data, split)
        for r, key in enumerate(zip(o["product_id"].tolist(), o["image_index"].tolist())):
            rows = ocr.show(str(ocr_data), key[0])
            words = dict(rows)[key[1]]
            read = "".join(normalize_word(w) for w, _ in words)
            has_ids = o["id_offsets"][r + 1] > o["id_offsets"][r]
            if key in titles:
                want = [normalize_word(w) for w in titles[key].split()]
                found += sum(w in read for w in want)  # spaces between words are often lost
                total += len(want)
            else:
                texty += bool(has_ids)
    assert total > 20
    assert found / total >= 0.8, (found, total)  # accents folded: PP-OCRv4 reads no é è ê à ç ô œ
    assert texty <= 2  # the other categories' pictures have no text


@engine
def test_manifest_units_and_keys_match_the_shards(ocr_data, small_units):
    ds = open_dataset(str(ocr_data))
    with open(ocr_data / "ocr" / "manifest.json") as f:
        man = json.load(f)
    n = ds.num_records("train") + ds.num_records("val")
    assert man["counts"]["images"] == n and man["fingerprint"] == ocr_files.repack_fingerprint(ds)[0]
    assert man["counts"]["units"] == sum(-(-ds.num_records(s) // UNIT) for s in ("train", "val"))
    assert man["hashing"] == ocr_files.HASHING
    from dali_pipes.records import read_examples

    keys = [(e["product_id"], e["image_index"]) for p in ds.shards("train")[0] for e in read_examples(p)]
    o = _read(ocr_data)
    assert list(zip(o["product_id"].tolist(), o["image_index"].tolist())) == keys
    assert len(o["id_offsets"]) == len(keys) + 1 and o["id_offsets"][-1] == len(o["ids"])
    assert o["ids"].min() >= 1 and o["ids"].max() < ocr_files.HASHING["buckets"]


def test_text_ids_fold_accents_and_drop_low_confidence():
    a = text_ids(["Château"], [0.9])
    assert a == text_ids(["chateau"], [0.99]) and len(a) == 1 + len("<chateau>") - 2  # the word + its 3-grams
    assert text_ids(["chateau"], [0.4]) == [] and text_ids([], []) == []
    assert set(text_ids(["forêt"], [0.9])) != set(a)
    assert normalize_word("Cœur,") == "coeur"


@engine
def test_an_empty_picture_is_an_empty_result():
    from PIL import Image, ImageDraw

    blank = np.full((180, 180, 3), 255, np.uint8)
    im = Image.new("RGB", (180, 180), "white")
    synthetic_text.draw_text(ImageDraw.Draw(im), (20, 80), "maison soleil", synthetic_text._font(20), (0, 0, 0))
    got = ocr.Reader().read([blank, None, np.asarray(im)[:, :, ::-1].copy()])
    assert got[0] == ([], []) and got[1] == ([], [])
    assert "maison" in "".join(got[2][0]) and all(0 < s <= 1 for s in got[2][1])


@engine
def test_resume_keeps_the_finished_units_and_does_the_rest(ocr_data, tmp_path, small_units, monkeypatch):
    data = tmp_path / "DATA"
    shutil.copytree(ocr_data, data)
    ref = _read(ocr_data)
    shutil.rmtree(data / "ocr")
    calls = []
    real = ocr.run_unit

    def dies_after_two(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill in the middle of the third unit
        calls.append(job[3])
        return real(job)

    monkeypatch.setattr(ocr, "run_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ocr.run_ocr(str(data), progress=False)
    units = sorted(os.listdir(data / "ocr" / "train"))
    assert len(units) == 2 and not os.path.exists(data / "ocr" / "manifest.json")
    stale = data / "ocr" / "train" / f".{units[0][:-4]}.npz.abcd.tmp"  # what a killed pool worker leaves
    stale.write_bytes(b"torn")
    with pytest.raises(OcrError, match="unfinished"):
        _read(data)
    calls.clear()
    monkeypatch.setattr(ocr, "run_unit", lambda job: (calls.append(job[3]), real(job))[1])
    ocr.run_ocr(str(data), progress=False)
    n_units = sum(-(-open_dataset(str(data)).num_records(s) // UNIT) for s in ("train", "val"))
    assert len(calls) == n_units - 2 and not stale.exists()  # the two finished units were kept
    got = _read(data)
    for k in ("product_id", "image_index", "id_offsets", "ids"):
        assert np.array_equal(got[k], ref[k]), k
    # a torn unit is redone, the others are kept
    with open(data / "ocr" / "train" / units[0], "r+b") as f:
        f.truncate(100)
    calls.clear()
    ocr.run_ocr(str(data), progress=False)
    assert len(calls) == 1 and np.array_equal(_read(data)["ids"], ref["ids"])
    # other settings than the ones it started with are refused by name
    with pytest.raises(OcrError, match="other settings.*det_size"):
        ocr.run_ocr(str(data), det_size=256, progress=False)


@engine
def test_an_ocr_dir_of_another_repack_is_refused(ocr_data, text_raw, tmp_path, small_units):
    other = _repack(text_raw, tmp_path / "OTHER", val_fraction=0.3)  # the same file, other shards and order
    shutil.copytree(ocr_data / "ocr", other / "ocr")
    with pytest.raises(OcrError, match="another repack") as e:
        _read(other)
    assert "tools.ocr --data" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(OcrError, match="another repack"):
        ocr.run_ocr(str(other), progress=False)
    # units without their manifest (a run that was killed) are refused by their file name too
    os.remove(other / "ocr" / "manifest.json")
    with pytest.raises(OcrError, match=r"train-00000-00000000\.npz: made from another repack"):
        ocr.run_ocr(str(other), progress=False)
    assert ocr.main(["--data", str(other), "--quiet"]) == 2


@engine
def test_repack_overwrite_removes_the_ocr_files_only(ocr_data, text_raw, tmp_path, small_units):
    data = tmp_path / "DATA"
    shutil.copytree(ocr_data, data)
    (data / "ocr" / "notes.txt").write_text("mine")
    _repack(text_raw, data, val_fraction=0.2, overwrite=True)
    left = [os.path.relpath(os.path.join(r, f), data / "ocr") for r, _, fs in os.walk(data / "ocr") for f in fs]
    assert left == ["notes.txt"]
    with pytest.raises(OcrError, match="unfinished"):
        _read(data)


def test_without_the_extra_the_ocr_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ocr.OcrUnavailable, match=r"pip install -e '\.\[ocr\]'"):
        ocr.Reader()
    assert ocr.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rapidocr-onnxruntime==1.4.4" in err and "--no-deps" in err
    # the rest does not need it: the generated text covers, the model input of the OCR files
    synthetic.make_dataset(str(tmp_path / "raw"), products=6, test_products=0, categories=2, text_categories=1)
    assert os.path.isfile(tmp_path / "raw" / synthetic_text.TITLES_FILE) and text_ids(["mot"], [1.0])


@engine
def test_cli_projects_the_time_and_workers_write_the_same_files(ocr_data, text_raw, tmp_path, small_units, capsys):
    data = tmp_path / "DATA"
    shutil.copytree(ocr_data, data)
    ref = _read(ocr_data)
    (data / "ocr" / "train" / "notes.txt").write_text("mine")  # --overwrite removes only what tools.ocr wrote
    assert ocr.main(["--data", str(data), "--workers", "2", "--overwrite"]) == 0
    assert (data / "ocr" / "train" / "notes.txt").read_text() == "mine"
    cap = capsys.readouterr()
    assert "projected" in cap.err and "ms a picture" in cap.err and "with 2 worker(s)" in cap.err
    n = sum(open_dataset(str(data)).num_records(s) for s in ("train", "val"))
    assert f"ocr: {n} pictures of" in cap.out.replace(",", "")
    got = _read(data)
    for k in ("product_id", "image_index", "id_offsets", "ids"):
        assert np.array_equal(got[k], ref[k]), k
    (pid, j), title = next(iter(_titles(text_raw).items()))
    if pid in set(ref["product_id"].tolist()):
        assert ocr.main(["--data", str(data), "--show", str(pid)]) == 0
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{pid} image {j}:")]
        assert len(line) == 1 and normalize_word(title.split()[0])[:3] in line[0].lower()
    assert ocr.main(["--data", str(data), "--show", "999999"]) == 1


@engine
def test_text_lookup_gives_each_pictures_ids_and_joins_a_products_tiles(ocr_data, small_units):
    from dali_pipes.ocr_files import TextLookup

    ds = open_dataset(str(ocr_data))
    tr, va = open_ocr(ds, "train"), open_ocr(ds, "val")
    look = TextLookup(tr, va)
    rows = [r for r in range(len(tr["product_id"])) if tr["id_offsets"][r + 1] > tr["id_offsets"][r]][:3]
    pid, idx = tr["product_id"][rows], tr["image_index"][rows]
    ids, off = look.batch(pid[::-1], idx[::-1])
    want = [tr["ids"][tr["id_offsets"][r]:tr["id_offsets"][r + 1]] for r in rows[::-1]]
    assert np.array_equal(ids, np.concatenate(want)) and off.tolist() == [0, len(want[0]), len(want[0]) + len(want[1])]
    p = int(va["product_id"][0])  # a val product, all its pictures (a tiled record: image_index -1)
    mine = np.flatnonzero(va["product_id"] == p)
    joined, off = look.batch([p], [-1])
    assert off.tolist() == [0] and np.array_equal(
        joined, np.concatenate([va["ids"][va["id_offsets"][r]:va["id_offsets"][r + 1]] for r in mine]))
    with pytest.raises(OcrError, match="product 999999 image 0 has no OCR entry"):
        look.batch([999999], [0])


@engine
def test_an_unlabelled_repack_gets_its_ocr_too(test_data_dir, tmp_path):
    data = tmp_path / "DATA_TEST"
    shutil.copytree(test_data_dir, data)
    man = ocr.run_ocr(str(data), progress=False)
    ds = open_dataset(str(data))
    o = open_ocr(ds, "test")
    assert man["counts"]["images"] == ds.num_records("test") == len(o["product_id"]) > 0
    assert man["counts"]["with_text"] < man["counts"]["images"] / 5  # no text on them: a few spurious boxes
