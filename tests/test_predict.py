"""Offline predict: rows per product in file order, accuracy, ensembles, TTA, class maps, bad test input."""
import csv
import os
import subprocess
import sys

import bson
import numpy as np
import pytest
import torch

from dali_pipes.writer.bson_io import iter_products
from tools.synthetic import make_jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured: the demo recipe (tiny model, 2 epochs, 2,000 products in 20 categories) scores 0.87 on the 300
# generated test products (chance 0.05); the threshold leaves a wide margin.
MIN_ACCURACY = 0.6


def run(*args, check=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(trained_demo):
    return trained_demo


class Result:
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


def predict(trained, tmp_path, capsys, *extra, name="sub.csv", bson_path=None, check=True):
    """tools.predict in this process (the command line itself is run by the first test)."""
    from tools import predict as cli

    out = tmp_path / name
    capsys.readouterr()
    rc = cli.main(["--bson", str(bson_path or trained["raw"] / "test.bson"), "--checkpoint", trained["ckpt"],
                   "--out", str(out), "--batch", "32", "--threads", "2", "--quiet", *extra])
    r = Result(rc, *capsys.readouterr())
    if check:
        assert rc == 0, r.stdout + r.stderr
    return out, r


def test_one_row_per_product_in_order_and_accurate(trained, tmp_path):
    out = tmp_path / "sub.csv"
    r = run("-m", "tools.predict", "--bson", str(trained["raw"] / "test.bson"), "--checkpoint", trained["ckpt"],
            "--out", str(out), "--batch", "32", "--threads", "2", "--quiet",
            "--labels", str(trained["raw"] / "test_answers.csv"), "--topk", "3")
    ids = [d["_id"] for d in iter_products(str(trained["raw"] / "test.bson"))]
    sub = rows(out)
    assert [int(x["_id"]) for x in sub] == ids
    cats = {int(x["category_id"]) for x in rows(trained["raw"] / "category_names.csv")}
    assert {int(x["category_id"]) for x in sub} <= cats
    acc = float(r.stdout.split("accuracy against")[1].split(":")[1].split()[0])
    answers = {int(x["_id"]): int(x["category_id"]) for x in rows(trained["raw"] / "test_answers.csv")}
    assert acc == pytest.approx(np.mean([answers[int(x["_id"])] == int(x["category_id"]) for x in sub]), abs=1e-4)
    assert acc >= MIN_ACCURACY
    top = rows(str(out).replace(".csv", ".top3.csv"))
    assert [x["category_id_1"] for x in top] == [x["category_id"] for x in sub]
    assert all(float(x["prob_1"]) >= float(x["prob_2"]) >= float(x["prob_3"]) for x in top)
    assert rows(str(out).replace(".csv", ".report.csv")) == []


def test_checkpoint_with_another_class_map_is_refused(trained, tmp_path, capsys):
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ck["category_ids"] = list(reversed(ck["category_ids"]))
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    _, r = predict(trained, tmp_path, capsys, "--checkpoint", str(other), check=False)
    assert r.returncode == 2 and "class map differs" in r.stderr and "Traceback" not in r.stderr
    assert f"{other} vs {trained['ckpt']}" in r.stderr and "trained on the same classes.csv" in r.stderr
    ck["config"]["data"]["tiled_k"] = 1  # an upsized member is checked the same way
    torch.save(ck, other)
    _, r = predict(trained, tmp_path, capsys, "--tiled", f"1={other}", check=False)
    assert r.returncode == 2 and "class map differs" in r.stderr and f"{other} vs {trained['ckpt']}" in r.stderr


def test_members_normalize_as_their_checkpoints_were_trained(trained, tmp_path):
    """A run's checkpoint records the model's input normalization; predict gives each member its own (an
    older checkpoint's data.mean/std in pixel levels included)."""
    from train.predict import load_member

    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert ck["input_norm"] == load_member(trained["ckpt"], torch.device("cpu")).model.input_norm()
    ck.pop("input_norm")
    ck["config"]["data"].update(mean=[127.5] * 3, std=[63.75] * 3)  # how an older version saved them
    old = tmp_path / "old.pt"
    torch.save(ck, old)
    norm = load_member(str(old), torch.device("cpu")).model.input_norm()
    assert norm["mean"] == pytest.approx([0.5] * 3) and norm["std"] == pytest.approx([0.25] * 3)


def test_bad_test_products_still_get_rows_and_are_reported(trained, tmp_path, capsys):
    good = list(iter_products(str(trained["raw"] / "test.bson")))[:20]
    png = __import__("io").BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((180, 180, 3), np.uint8)).save(png, "PNG")
    bad = [
        {"_id": 900001, "imgs": [{"picture": make_jpeg(0, seed=1)[:700]}]},  # corrupt (cut off)
        {"_id": 900002, "imgs": [{"picture": png.getvalue()}]},  # PNG
        {"_id": 900003, "imgs": []},  # no images
        {"_id": 900004, "imgs": [{"picture": png.getvalue()}, {"picture": make_jpeg(1, seed=2)}]},  # one good
    ]
    docs = good[:7] + bad[:2] + good[7:14] + bad[2:] + good[14:]
    src = tmp_path / "bad_test.bson"
    with open(src, "wb") as f:
        for d in docs:
            f.write(bson.encode(d))
    out, r = predict(trained, tmp_path, capsys, "--fallback", str(rows(trained["raw"] / "category_names.csv")[0]["category_id"]),
                     bson_path=src)
    sub = rows(out)
    assert [int(x["_id"]) for x in sub] == [d["_id"] for d in docs]
    report = {int(x["_id"]): x for x in rows(str(out).replace(".csv", ".report.csv"))}
    assert set(report) == {900001, 900002, 900003}
    assert report[900001]["reason"].startswith("no readable image: image 0: truncated JPEG")
    assert report[900002]["reason"] == "no readable image: image 0: not a JPEG (PNG image)"
    assert report[900003]["reason"] == "product has no images"
    fb = rows(trained["raw"] / "category_names.csv")[0]["category_id"]
    assert all(x["category_id"] == fb for x in sub if int(x["_id"]) in report)
    assert "3 without a readable image" in r.stdout


def test_no_id_repeated_id_and_the_default_fallback(trained, tmp_path, capsys):
    import collections

    answers = {int(x["_id"]): int(x["category_id"]) for x in rows(trained["raw"] / "test_answers.csv")}
    cats = sorted(int(x["category_id"]) for x in rows(trained["raw"] / "category_names.csv"))
    docs = list(iter_products(str(trained["raw"] / "test.bson")))
    # 8 products of the test set's largest category (not the lowest id, which a broken fallback of class 0
    # would give) and one each of 6 others: the model (about 0.9 accurate) predicts that category most often
    major = collections.Counter(answers.values()).most_common(1)[0][0]
    assert major != cats[0]
    good = [d for d in docs if answers[d["_id"]] == major][:8]
    others = [next(d for d in docs if answers[d["_id"]] == c) for c in [c for c in cats if c != major][1:7]]
    good = [d for pair in zip(good, others + [None, None]) for d in pair if d is not None]
    png = __import__("io").BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((180, 180, 3), np.uint8)).save(png, "PNG")
    first, later = good[3]["_id"], good[12]["_id"]
    body_bad = bytearray(bson.encode({"_id": 900012, "imgs": [{"picture": make_jpeg(2, seed=5)}]}))
    body_bad[13] = 0x7F  # the element after the leading _id: the body does not decode, the offset scan reads the _id
    bad = [{"imgs": [{"picture": make_jpeg(0, seed=3)}]},  # no _id: no row possible
           {"_id": first, "imgs": [{"picture": make_jpeg(1, seed=4)}]},  # repeats an earlier _id
           {"_id": 900010, "imgs": []},
           {"_id": 900011, "imgs": [{"picture": png.getvalue()}]},
           bytes(body_bad),
           {"_id": later, "imgs": []}]  # an unusable first copy: the later good copy is written, one row
    src = tmp_path / "edge.bson"
    with open(src, "wb") as f:
        for d in good[:5] + bad[:2] + good[5:9] + bad[2:] + good[9:]:
            f.write(d if isinstance(d, bytes) else bson.encode(d))
    out, r = predict(trained, tmp_path, capsys, bson_path=src)
    sub = rows(out)
    # one row per _id, in the file's order: the document without _id and the repeated copies have none
    assert [int(x["_id"]) for x in sub] == [d["_id"] for d in good[:9]] + [900010, 900011, 900012] + \
        [d["_id"] for d in good[9:]]
    assert len(sub) == len(good) + 3 == 17
    written = {int(x["_id"]): int(x["category_id"]) for x in sub}
    # the default fallback: the category predicted most often among the products with images
    tally = collections.Counter(written[d["_id"]] for d in good).most_common()
    assert tally[0][0] == major and tally[0][1] > tally[1][1], tally
    assert written[900010] == written[900011] == written[900012] == major
    report = rows(str(out).replace(".csv", ".report.csv"))
    assert [x["_id"] for x in report] == ["900010", "900011", "900012", str(first), str(later), ""]
    by_id = {x["_id"]: x for x in report}
    assert by_id["900010"]["reason"] == "product has no images"
    assert by_id["900011"]["reason"] == "no readable image: image 0: not a JPEG (PNG image)"
    assert [int(by_id[k]["category_id_written"]) for k in ("900010", "900011")] == [major, major]
    assert by_id["900012"]["reason"].startswith("BSON document does not decode")
    assert int(by_id["900012"]["category_id_written"]) == major
    assert by_id[str(first)]["reason"].startswith("duplicate _id (the copy at offset ")
    assert "no second row" in by_id[str(first)]["reason"]
    assert int(by_id[str(first)]["category_id_written"]) == written[first]
    assert by_id[str(later)]["reason"].startswith("product has no images (duplicate _id: the copy at offset ")
    assert "no second row" in by_id[str(later)]["reason"]
    assert "_id None is missing" in by_id[""]["reason"] and "no _id, so no row" in by_id[""]["reason"]
    assert "3 without a readable image" in r.stdout and "1 documents had no readable _id" in r.stdout
    assert "2 documents repeat the _id of another copy" in r.stdout


def test_unknown_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    from tools import predict as cli

    rc = cli.main(["--bson", str(trained["raw"] / "test.bson"), "--checkpoint", str(tmp_path / "missing.pt"),
                   "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "missing.pt: no such checkpoint" in capsys.readouterr().err


def test_labels_from_a_labelled_bson(trained, tmp_path, capsys):
    answers = {int(x["_id"]): int(x["category_id"]) for x in rows(trained["raw"] / "test_answers.csv")}
    docs = [dict(d, category_id=answers[d["_id"]]) for d in iter_products(str(trained["raw"] / "test.bson"))][:40]
    src = tmp_path / "held_out.bson"
    with open(src, "wb") as f:
        for d in docs:
            f.write(bson.encode(d))
    out, r = predict(trained, tmp_path, capsys, "--labels", str(src), bson_path=src)
    acc = float(r.stdout.split("accuracy against")[1].split(":")[1].split()[0])
    sub = rows(out)
    assert acc == pytest.approx(np.mean([int(x["category_id"]) == answers[int(x["_id"])] for x in sub]), abs=1e-4)
    assert len(sub) == 40


# ---- values computed by hand: PIL decode, centre crop, the model, softmax, means ------------------------------
N_SMALL = 40  # the first products of the demo test set: 1 to 4 images each


@pytest.fixture(scope="module")
def small(trained, tmp_path_factory):
    """The first N_SMALL demo test products as a BSON and its unlabelled repack, their JPEGs per product,
    and a second checkpoint (the demo one with its last layer changed) for ensembles and tiled models; that one
    with another crop, and the demo one as an upsized (data.tiled_k 1) member with another crop."""
    from tools import repack

    d = tmp_path_factory.mktemp("small")
    docs = list(iter_products(str(trained["raw"] / "test.bson")))[:N_SMALL]
    with open(d / "test.bson", "wb") as f:
        for doc in docs:
            f.write(bson.encode(doc))
    assert repack.main(["--bson", str(d / "test.bson"), "--unlabelled", "--out", str(d / "T"), "--quiet"]) == 0
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    ck["model"]["fc.weight"] = ck["model"]["fc.weight"][torch.randperm(ck["model"]["fc.weight"].shape[0], generator=g)]
    torch.save(ck, d / "other.pt")
    tiled = {}
    for k in (2, 4):  # the same weights as a tiled model: a checkpoint of a finetune_k{K} run says data.tiled_k K
        ck["config"]["data"]["tiled_k"] = k
        tiled[k] = str(d / f"other_k{k}.pt")
        torch.save(ck, tiled[k])
    ck["config"]["data"].update(tiled_k=0, crop=96)  # the same weights read through other pictures
    torch.save(ck, d / "other_96.pt")
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ck["config"]["data"].update(tiled_k=1, crop=112)  # the demo weights as an upsized run (finetune_k1_*) says
    torch.save(ck, d / "other_k1.pt")
    return {"dir": d, "bson": d / "test.bson", "data": d / "T", "ids": [doc["_id"] for doc in docs],
            "pics": [[img["picture"] for img in doc["imgs"]] for doc in docs], "other": str(d / "other.pt"),
            "tiled": tiled, "other_96": str(d / "other_96.pt"), "k1": str(d / "other_k1.pt")}


def _loader_dtype(small, ckpt):
    """What the eval loader hands the model (float pictures normalized by the loader, or uint8)."""
    from train.predict import load_member, make_loader

    m = load_member(ckpt, torch.device("cpu"))
    images, _, _ = next(iter(make_loader(m, str(small["data"]), "dali-cpu", 4, 1, torch.device("cpu"))))
    return images.dtype


class Hand:
    """A checkpoint's model run by hand on PIL-decoded, centre-cropped pictures."""

    def __init__(self, ckpt, uint8):
        from models import create_model

        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        self.model = create_model(c["model_name"], int(c["num_classes"]), head=c["config"]["model"]["head"])
        self.model.load_state_dict(c["model"])
        self.model.eval()
        data = c["config"]["data"]
        self.crop, self.uint8 = data["crop"], uint8
        if not uint8:  # a loader that still normalizes, with the checkpoint's settings
            self.mean, self.std = np.array(data["mean"], np.float32), np.array(data["std"], np.float32)

    def crop_of(self, jpeg):
        from PIL import Image

        a = np.asarray(Image.open(__import__("io").BytesIO(jpeg)).convert("RGB"))
        y, x = (a.shape[0] - self.crop) // 2, (a.shape[1] - self.crop) // 2
        return a[y:y + self.crop, x:x + self.crop]

    def probs(self, pictures, flip=False):
        """(N, C) float64 softmax of (N, H, W, 3) uint8 pictures."""
        a = np.stack(pictures)
        if flip:
            a = a[:, :, ::-1]
        a = np.ascontiguousarray(a)
        x = torch.from_numpy(a) if self.uint8 else \
            torch.from_numpy(((a.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            return self.model(x).double().softmax(1).numpy()

    def product(self, jpegs, flip=False):
        crops = [self.crop_of(j) for j in jpegs]
        p = self.probs(crops)
        if flip:
            p = (p + self.probs(crops, flip=True)) / 2
        return p.mean(0)

    def tiled(self, jpegs, flip=False):
        """The tiled product's probabilities; ``flip``: each tile mirrored in its place."""
        c = [self.crop_of(j)[:, ::-1] if flip else self.crop_of(j) for j in jpegs[:4]]
        pic = np.concatenate([np.concatenate(c[:2], 1), np.concatenate(c[2:], 1)], 0) if len(c) == 4 \
            else np.concatenate(c, 1)
        return self.probs([pic])[0]


def predict_small(small, tmp_path, capsys, name, *extra, ckpt=None, trained=None):
    from tools import predict as cli

    out = tmp_path / f"{name}.csv"
    capsys.readouterr()
    rc = cli.main(["--data", str(small["data"]), "--checkpoint", ckpt, "--out", str(out), "--threads", "1",
                   "--quiet", "--probs", str(tmp_path / f"{name}.npy"), *extra])
    assert rc == 0, capsys.readouterr()
    sub = rows(out)
    assert [int(x["_id"]) for x in sub] == small["ids"]
    return sub, np.load(tmp_path / f"{name}.npy").astype(np.float64)


def test_product_probabilities_are_image_means_by_hand_and_batches_cut_products(trained, small, tmp_path, capsys):
    hand = Hand(trained["ckpt"], _loader_dtype(small, trained["ckpt"]) == torch.uint8)
    expect = np.stack([hand.product(p) for p in small["pics"]])
    counts = np.array([len(p) for p in small["pics"]])
    start = np.cumsum(counts) - counts
    cut = start // 3 != (start + counts - 1) // 3  # products whose images straddle a batch of 3
    assert cut.sum() >= 5 and set(counts) == {1, 2, 3, 4}
    sub3, p3 = predict_small(small, tmp_path, capsys, "b3", "--batch", "3", ckpt=trained["ckpt"])
    sub64, p64 = predict_small(small, tmp_path, capsys, "b64", "--batch", "64", ckpt=trained["ckpt"])
    np.testing.assert_allclose(p3, expect, atol=2e-3)
    np.testing.assert_allclose(p64, expect, atol=2e-3)
    assert sub3 == sub64
    cats = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["category_ids"]
    top2 = np.sort(expect, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    assert clear.sum() > N_SMALL // 2
    assert [int(x["category_id"]) for x, c in zip(sub3, clear) if c] == \
        [cats[i] for i in expect.argmax(1)[clear]]


def test_weighted_ensemble_of_two_checkpoints_and_flip_tta_by_hand(trained, small, tmp_path, capsys):
    uint8 = _loader_dtype(small, trained["ckpt"]) == torch.uint8
    a, b = Hand(trained["ckpt"], uint8), Hand(small["other"], uint8)
    pa = np.stack([a.product(p) for p in small["pics"]])
    pb = np.stack([b.product(p) for p in small["pics"]])
    assert np.abs(pa - pb).max() > 0.05  # two different models
    _, pe = predict_small(small, tmp_path, capsys, "ens", "--checkpoint", small["other"] + ":3", "--batch", "5",
                          ckpt=trained["ckpt"])
    np.testing.assert_allclose(pe, (pa + 3 * pb) / 4, atol=2e-3)
    _, pf = predict_small(small, tmp_path, capsys, "flip", "--tta", "flip", "--batch", "5", ckpt=trained["ckpt"])
    flipped = np.stack([a.product(p, flip=True) for p in small["pics"]])
    assert np.abs(flipped - pa).max() > 0.01  # the mirror view changes the answer
    np.testing.assert_allclose(pf, flipped, atol=2e-3)


def test_tiled_models_blend_half_and_half_by_hand(trained, small, tmp_path, capsys):
    uint8 = _loader_dtype(small, trained["ckpt"]) == torch.uint8
    a, b = Hand(trained["ckpt"], uint8), Hand(small["other"], uint8)
    _, pt = predict_small(small, tmp_path, capsys, "tiled", "--tiled", f"2={small['tiled'][2]}", "--tiled",
                          f"4={small['tiled'][4]}", "--batch", "3", ckpt=trained["ckpt"])
    for pics, got in zip(small["pics"], pt):
        img = a.product(pics)
        want = (img + b.tiled(pics)) / 2 if len(pics) in (2, 4) else img
        np.testing.assert_allclose(got, want, atol=2e-3)


def test_tiled_flip_tta_mirrors_each_tile_in_its_place_by_hand(trained, small, tmp_path, capsys):
    """--tta flip on a tiled product: the mirror view is the one training draws (each tile mirrored, the tile
    order kept), not the mirror of the whole strip or grid."""
    uint8 = _loader_dtype(small, trained["ckpt"]) == torch.uint8
    a, b = Hand(trained["ckpt"], uint8), Hand(small["other"], uint8)
    _, pt = predict_small(small, tmp_path, capsys, "tiledflip", "--tta", "flip", "--tiled", f"2={small['tiled'][2]}",
                          "--tiled", f"4={small['tiled'][4]}", "--batch", "3", ckpt=trained["ckpt"])
    for pics, got in zip(small["pics"], pt):
        img = a.product(pics, flip=True)
        want = (img + (b.tiled(pics) + b.tiled(pics, flip=True)) / 2) / 2 if len(pics) in (2, 4) else img
        np.testing.assert_allclose(got, want, atol=2e-3)


def test_members_of_three_picture_settings_blend_by_member_and_kind_weights_by_hand(trained, small, tmp_path,
                                                                                     capsys):
    """Single-image members at two crops (one loader each), an upsized member for the single-image products
    (products/k1, its own crop) and a tiled model of K=2: per product, the weighted mean over its kinds of
    each kind's weighted mean over the members that score it; the time per setting is reported."""
    uint8 = _loader_dtype(small, trained["ckpt"]) == torch.uint8
    a, b96, up = Hand(trained["ckpt"], uint8), Hand(small["other_96"], uint8), Hand(small["k1"], uint8)
    t2 = Hand(small["tiled"][2], uint8)
    assert (a.crop, b96.crop, up.crop) == (80, 96, 112)
    sub, pt = predict_small(small, tmp_path, capsys, "mixed", "--checkpoint", small["other_96"] + ":3",
                            "--tiled", f"1={small['k1']}", "--tiled", f"2={small['tiled'][2]}", "--weight",
                            "upsized=2", "--weight", "tiled=0.5", "--batch", "3", ckpt=trained["ckpt"])
    assert {len(p) for p in small["pics"]} == {1, 2, 3, 4}
    for pics, got in zip(small["pics"], pt):
        img = (a.product(pics) + 3 * b96.product(pics)) / 4
        if len(pics) == 1:
            want = (img + 2 * up.tiled(pics)) / 3
            assert np.abs(want - img).max() > 0.02  # the upsized member changes the answer
        elif len(pics) == 2:
            want = (img + 0.5 * t2.tiled(pics)) / 1.5
        else:  # no member for K=3, 4: the single-image members alone
            want = img
        np.testing.assert_allclose(got, want, atol=2e-3)


def test_predict_reports_each_picture_setting_once(trained, small, tmp_path):
    """One loader per distinct setting (two members of one setting share it), each with its products counted;
    the command line prints one line per setting."""
    from train.predict import load_ensemble, predict

    members = load_ensemble([trained["ckpt"], small["other"], small["other_96"]], torch.device("cpu"),
                            [(1, small["k1"]), (2, small["tiled"][2])])
    s = predict(str(small["data"]), members, str(tmp_path / "s.csv"), batch=8, threads=1, progress=False)
    n_img = np.array([len(p) for p in small["pics"]])
    got = {(r["setting"], r["kind"], r["models"], r["products"]) for r in s["settings"]}
    assert got == {("images 180/80", "images", 2, N_SMALL), ("images 180/96", "images", 1, N_SMALL),
                   ("K=1 180/112", "upsized", 1, int((n_img == 1).sum())),
                   ("K=2 180/80", "tiled", 1, int((n_img == 2).sum()))}
    assert all(r["batches"] > 0 and r["model_seconds"] > 0 for r in s["settings"])
    r = run("-m", "tools.predict", "--data", str(small["data"]), "--checkpoint", trained["ckpt"], "--tiled",
            f"1={small['k1']}", "--out", str(tmp_path / "c.csv"), "--threads", "1", "--quiet")
    lines = [x.split() for x in r.stdout.splitlines()]
    assert [x[:4] for x in lines if x[0] in ("images", "K=1")] == [["images", "180/80", "images", "1"],
                                                                   ["K=1", "180/112", "upsized", "1"]], r.stdout


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_mirror_view_of_nhwc_and_nchw_batches(k):
    from train.predict import mirror

    side, across = 4, 2 if k == 4 else max(1, k)
    h = 2 * side if k == 4 else side
    x = torch.arange(2 * h * across * side * 3, dtype=torch.float32).view(2, h, across * side, 3)
    want = x.clone()
    for t in range(across):
        want[:, :, t * side:(t + 1) * side] = x[:, :, t * side:(t + 1) * side].flip(2)
    assert torch.equal(mirror(x, k), want)
    assert torch.equal(mirror(x.permute(0, 3, 1, 2), k), want.permute(0, 3, 1, 2))  # NCHW


def test_products_with_more_than_four_images_use_all_images_and_the_tiled_model_of_four(trained, small, tmp_path,
                                                                                         capsys):
    from tools import repack

    uint8 = _loader_dtype(small, trained["ckpt"]) == torch.uint8
    a, b = Hand(trained["ckpt"], uint8), Hand(small["other"], uint8)
    by_n = {}
    for p in small["pics"]:
        by_n.setdefault(len(p), p)
    products = [by_n[2], by_n[4] + by_n[2], by_n[4], by_n[3] + by_n[2], by_n[1]]  # 2, 6, 4, 5 and 1 images
    with open(tmp_path / "many.bson", "wb") as f:
        for i, pics in enumerate(products):
            f.write(bson.encode({"_id": 800 + i, "imgs": [{"picture": p} for p in pics]}))
    assert repack.main(["--bson", str(tmp_path / "many.bson"), "--unlabelled", "--out", str(tmp_path / "M"),
                        "--quiet"]) == 0
    many = {"data": tmp_path / "M", "ids": [800 + i for i in range(len(products))]}
    ck = torch.load(small["tiled"][2], map_location="cpu", weights_only=True)
    ck["config"]["data"]["tiled_k"] = 3
    torch.save(ck, tmp_path / "k3.pt")  # this set has no product of 3 images: its model scores none
    _, pt = predict_small(many, tmp_path, capsys, "many", "--tiled", f"4={small['tiled'][4]}", "--tiled",
                          f"3={tmp_path / 'k3.pt'}", "--batch", "4", ckpt=trained["ckpt"])
    for pics, got in zip(products, pt):
        img = a.product(pics)  # every image of the product
        want = (img + b.tiled(pics[:4])) / 2 if len(pics) >= 4 else img
        np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.abs(a.product(products[1]) - a.product(products[1][:4])).max() > 0.01  # the 5th and 6th count


# ---- duplicate lookup --------------------------------------------------------------------------------------
def test_repack_records_every_image_hash_with_its_product_and_category(trained):
    import hashlib

    from dali_pipes.records import HASHES_FILE

    h = np.load(os.path.join(str(trained["data"]), HASHES_FILE))
    want = sorted((int.from_bytes(hashlib.blake2b(img["picture"], digest_size=8).digest(), "little"), d["_id"],
                   d["category_id"]) for d in iter_products(str(trained["raw"] / "train.bson")) for img in d["imgs"])
    assert sorted(zip(h["hash"].tolist(), h["product_id"].tolist(), h["category_id"].tolist())) == want
    assert np.all(np.diff(h["hash"].astype(np.float64)) >= 0)  # sorted for the lookup


def test_dedup_gives_duplicates_the_train_label(trained, small, tmp_path, capsys):
    from tools import repack

    cats = [int(x["category_id"]) for x in rows(trained["raw"] / "category_names.csv")]
    base, _ = predict_small(small, tmp_path, capsys, "base", ckpt=trained["ckpt"])
    model_says = {int(x["_id"]): int(x["category_id"]) for x in base}
    one = next(i for i, p in enumerate(small["pics"]) if len(p) == 1)
    two = next(i for i, p in enumerate(small["pics"]) if len(p) == 2)
    i1, (i2a, i2b) = small["pics"][one][0], small["pics"][two]
    # Train labels the model would not give: the category after the one it predicts.
    c1 = cats[(cats.index(model_says[small["ids"][one]]) + 1) % len(cats)]
    c2 = cats[(cats.index(c1) + 1) % len(cats)]
    c3 = cats[(cats.index(model_says[small["ids"][two]]) + 1) % len(cats)]
    train = [{"_id": 500003, "category_id": c2, "imgs": [{"picture": i1}]},  # minority label of i1
             {"_id": 500001, "category_id": c1, "imgs": [{"picture": i1}]},
             {"_id": 500002, "category_id": c1, "imgs": [{"picture": i1}, {"picture": make_jpeg(3, seed=9)}]},
             {"_id": 500004, "category_id": c3, "imgs": [{"picture": i2a}, {"picture": i2b}]}]
    train += [{"_id": 510000 + j, "category_id": cats[j % len(cats)], "imgs": [{"picture": make_jpeg(j % 5, seed=j)}]}
              for j in range(6)]
    test = [{"_id": 600001, "imgs": [{"picture": i1}]},  # i1: in 3 train products, 2 of them c1
            {"_id": 600002, "imgs": [{"picture": i2b}, {"picture": i2a}]},  # both images of 500004
            {"_id": 600003, "imgs": [{"picture": i2a}, {"picture": make_jpeg(4, seed=77)}]},  # one image only
            {"_id": 600004, "imgs": [{"picture": make_jpeg(2, seed=78)}]}]
    for name, docs in (("dtrain.bson", train), ("dtest.bson", test)):
        with open(tmp_path / name, "wb") as f:
            for doc in docs:
                f.write(bson.encode(doc))
    assert repack.main(["--bson", str(tmp_path / "dtrain.bson"), "--categories",
                        str(trained["raw"] / "category_names.csv"), "--out", str(tmp_path / "D"), "--quiet"]) == 0
    out, r = predict(trained, tmp_path, capsys, "--dedup", str(tmp_path / "D"), name="dedup.csv",
                     bson_path=tmp_path / "dtest.bson")
    sub = {int(x["_id"]): int(x["category_id"]) for x in rows(out)}
    plain, _ = predict(trained, tmp_path, capsys, name="plain.csv", bson_path=tmp_path / "dtest.bson")
    plain = {int(x["_id"]): int(x["category_id"]) for x in rows(plain)}
    assert sub[600001] == c1 != plain[600001] and sub[600002] == c3 != plain[600002]
    assert sub[600003] == plain[600003] and sub[600004] == plain[600004]
    report = {int(x["_id"]): x for x in rows(str(out).replace(".csv", ".report.csv"))}
    assert set(report) == {600001, 600002}
    assert report[600001]["reason"].startswith("duplicate of train product 500001 (")
    assert report[600002]["reason"] == "duplicate of train product 500004"
    assert int(report[600002]["category_id_written"]) == c3
    assert "2 products are duplicates" in r.stdout


def test_dedup_needs_a_labelled_repack_with_hashes(trained, small, tmp_path, capsys):
    from dali_pipes.records import HASHES_FILE

    _, r = predict(trained, tmp_path, capsys, "--dedup", str(small["data"]), bson_path=small["bson"], check=False)
    assert r.returncode == 2 and "unlabelled repack" in r.stderr
    import shutil

    d = tmp_path / "old"
    shutil.copytree(trained["data"], d)
    os.remove(d / HASHES_FILE)
    _, r = predict(trained, tmp_path, capsys, "--dedup", str(d), bson_path=small["bson"], check=False)
    assert r.returncode == 2 and f"{HASHES_FILE} is missing" in r.stderr and "--overwrite" in r.stderr


@pytest.mark.gpu
def test_gpu_predict_matches_cpu(trained, small, tmp_path, capsys):
    _, cpu = predict_small(small, tmp_path, capsys, "cpu", "--backend", "dali-cpu", "--tta", "flip",
                           ckpt=trained["ckpt"])
    _, gpu = predict_small(small, tmp_path, capsys, "gpu", "--backend", "dali-gpu", "--tta", "flip", "--batch", "7",
                           ckpt=trained["ckpt"])
    # dali-cpu decoding, the models on the GPU (the default device): the CPU's pixels, the GPU's arithmetic
    _, cpu_to_gpu = predict_small(small, tmp_path, capsys, "cpu2gpu", "--backend", "dali-cpu", "--tta", "flip",
                                  ckpt=trained["ckpt"])
    assert np.abs(cpu_to_gpu - cpu).mean() < 0.01
    # bf16 autocast and the GPU JPEG decoder move a few probabilities by up to ~0.06 (seen on an H200: 13 of 800
    # above 0.03); on average they agree to a fraction of a percent
    diff = np.abs(gpu - cpu)
    assert diff.mean() < 0.01 and diff.max() < 0.15, (diff.mean(), diff.max())
    top2 = np.sort(cpu, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    assert (gpu.argmax(1) == cpu.argmax(1))[clear].all()


# ---- tiling, device, temporaries -------------------------------------------------------------------------
def test_member_trained_on_other_tiling_is_refused(trained, small, tmp_path, capsys):
    """--checkpoint takes single-image models (data.tiled_k 0), --tiled K= models of K: a mismatch is one error
    line naming the file and both values (not silently degraded predictions)."""
    from tools import predict as cli

    def run_cli(*extra):
        capsys.readouterr()
        rc = cli.main(["--data", str(small["data"]), "--out", str(tmp_path / "x.csv"), "--quiet", *extra])
        return rc, capsys.readouterr().err.strip()

    k1, k2, one = small["k1"], small["tiled"][2], trained["ckpt"]
    for extra, bad, got, want, use in [
            (["--checkpoint", k2], k2, 2, 0, f"--tiled 2={k2}"),
            (["--checkpoint", one, "--tiled", f"3={k2}"], k2, 2, 3, f"--tiled 2={k2}"),
            (["--checkpoint", one, "--tiled", f"2={one}"], one, 0, 2, f"--checkpoint {one}"),
            (["--checkpoint", one, "--tiled", f"2={k1}"], k1, 1, 2, f"--tiled 1={k1}"),  # upsized for tiled
            (["--checkpoint", one, "--tiled", f"1={k2}"], k2, 2, 1, f"--tiled 2={k2}"),  # and the reverse
            (["--checkpoint", k1], k1, 1, 0, f"--tiled 1={k1}")]:
        rc, err = run_cli(*extra)
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"predict: error: {bad}: trained with data.tiled_k {got}, ") and \
            f"need data.tiled_k {want}; pass it as {use}" in err, err
    assert "single-image products, upsized (--tiled 1=)" in run_cli("--checkpoint", one, "--tiled", f"1={k2}")[1]
    for extra, msg in [(["--weight", "tiled=2"], "--weight tiled=2.0: no member of that kind"),
                       (["--weight", "text=1"], "--weight text=1.0: the kinds are images, upsized, tiled"),
                       (["--tiled", f"1={k1}", "--weight", "upsized=0"], "a kind's weight must be > 0")]:
        rc, err = run_cli("--checkpoint", one, *extra)
        assert rc == 2 and err.startswith("predict: error: ") and msg in err, err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("cuda", [True, False])
def test_device_is_its_own_setting_not_the_backend(monkeypatch, cuda):
    from train.predict import PredictError, resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    gpu = torch.device("cuda")
    cpu = torch.device("cpu")
    if cuda:  # the models go to the GPU whatever decodes the JPEGs
        assert resolve_placement(None, None) == ("dali-gpu", gpu)
        assert resolve_placement("dali-cpu", None) == ("dali-cpu", gpu)
        assert resolve_placement(None, "cpu") == ("dali-cpu", cpu)
        with pytest.raises(PredictError, match="--backend dali-cpu"):
            resolve_placement("dali-gpu", "cpu")
    else:
        assert resolve_placement(None, None) == ("dali-cpu", cpu)
        assert resolve_placement("dali-gpu", None) == ("dali-cpu", cpu)  # the backend policy's fallback
        with pytest.raises(PredictError, match="--device cuda: torch sees no CUDA device"):
            resolve_placement("dali-cpu", "cuda")


def test_predict_clean_and_bench_put_the_models_on_the_gpu_with_dali_cpu(monkeypatch, tmp_path, capsys):
    """On a GPU machine (CUDA faked here: the commands stop once the models' device is chosen), --backend
    dali-cpu still loads the models onto cuda, and the loader gets that device (its page-locked copy stream,
    the one training uses, takes the batches there)."""
    import train.predict as tp
    from tools import bench, clean, predict as cli

    seen = []

    def stop(*args, **kw):
        seen.append(next(a for a in (*args, *kw.values()) if isinstance(a, torch.device)))
        raise tp.PredictError("stopped by the test")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tp, "load_ensemble", stop)
    monkeypatch.setattr(tp, "load_member", stop)
    common = ["--checkpoint", "x.pt", "--backend", "dali-cpu"]
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "s.csv"), *common]) == 2
    assert clean.main(["--data", str(tmp_path), "--drop-fraction", "0.1", "--out", str(tmp_path / "e.csv"),
                       *common]) == 2
    assert bench.main(["predict", "--data", str(tmp_path), *common]) == 2
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "s.csv"), "--device", "cpu", *common]) == 2
    assert [d.type for d in seen] == ["cuda", "cuda", "cuda", "cpu"]
    assert "stopped by the test" in capsys.readouterr().err

    got = {}
    monkeypatch.setattr("dali_pipes.loader.build_loader", lambda *a, **kw: got.update(kw) or [None])
    member = tp.Member("x.pt", 1.0, None, {"data": {}}, [1])
    tp.make_loader(member, str(tmp_path), "dali-cpu", 4, 1, torch.device("cuda"))
    assert got["device"] == torch.device("cuda")


def _no_temporaries(*dirs):
    return [os.path.join(r, n) for d in dirs for r, ds, ns in os.walk(d) for n in ds + ns
            if n.endswith(".tmp") or n.startswith("predict-")]


def test_probs_temporary_is_removed_on_failure(trained, small, tmp_path, capsys, monkeypatch):
    import train.predict as tp

    def out_of_memory(self):
        raise MemoryError("out of memory (by the test)")

    monkeypatch.setattr(tp.Readback, "result", out_of_memory)
    with pytest.raises(MemoryError):
        predict_small(small, tmp_path, capsys, "oom", ckpt=trained["ckpt"])
    assert not (tmp_path / "oom.npy").exists() and _no_temporaries(tmp_path) == []


_SIGTERM_MID_PREDICT = r"""
import os, signal, sys
import train.predict as tp
result = tp.Readback.result
def terminated(self):  # SIGTERM arrives while the probabilities are being written
    os.kill(os.getpid(), signal.SIGTERM)
    return result(self)
tp.Readback.result = terminated
from tools import predict
sys.exit(predict.main(sys.argv[1:]))
"""


def test_sigterm_removes_the_probs_temporary_and_the_bson_repack(trained, small, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    r = run("-c", _SIGTERM_MID_PREDICT, "--bson", str(small["bson"]), "--checkpoint", trained["ckpt"], "--out",
            str(out / "sub.csv"), "--probs", str(out / "p.npy"), "--workdir", str(work), "--threads", "1",
            "--batch", "8", "--quiet", check=False)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    assert "predict: interrupted (SIGTERM)" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(out) == [] and os.listdir(work) == []


def test_inference_autocast_follows_the_training_amp_policy(monkeypatch):
    """Predict and clean autocast bf16 only on a GPU with hardware bf16 (resolve_amp); elsewhere float32."""
    import dali_pipes.config as dc
    from train.predict import inference_autocast

    made = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: made.append((device_type, kw)))
    for fast, want in ((True, {"dtype": torch.bfloat16}), (False, {"enabled": False})):
        monkeypatch.setattr(dc, "fast_bf16", lambda device, fast=fast: fast)
        inference_autocast(torch.device("cuda"))()
        assert made.pop() == ("cuda", want)
    monkeypatch.setattr(dc, "fast_bf16", lambda device: True)  # a CPU keeps float32 even where it has bf16
    inference_autocast(torch.device("cpu"))()
    assert made.pop() == ("cpu", {"enabled": False})
