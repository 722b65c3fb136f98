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


def test_ensemble_of_the_same_checkpoint_equals_one_and_flip_changes_probs(trained, tmp_path, capsys):
    one, _ = predict(trained, tmp_path, capsys, "--probs", str(tmp_path / "one.npy"), name="one.csv")
    two, _ = predict(trained, tmp_path, capsys, "--checkpoint", trained["ckpt"] + ":2", "--probs", str(tmp_path / "two.npy"),
                     name="two.csv")
    flip, _ = predict(trained, tmp_path, capsys, "--tta", "flip", "--probs", str(tmp_path / "flip.npy"), name="flip.csv")
    p1, p2, pf = (np.load(tmp_path / f"{n}.npy").astype(np.float32) for n in ("one", "two", "flip"))
    assert rows(one) == rows(two)
    np.testing.assert_allclose(p1, p2, atol=2e-3)
    np.testing.assert_allclose(p1.sum(1), 1.0, atol=1e-2)
    assert len(rows(flip)) == len(rows(one)) == p1.shape[0]
    assert np.abs(pf - p1).max() > 1e-3  # the mirrored views were really used


def test_checkpoint_with_another_class_map_is_refused(trained, tmp_path, capsys):
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ck["category_ids"] = list(reversed(ck["category_ids"]))
    other = tmp_path / "other.pt"
    torch.save(ck, other)
    _, r = predict(trained, tmp_path, capsys, "--checkpoint", str(other), check=False)
    assert r.returncode == 2 and "class map differs" in r.stderr and "Traceback" not in r.stderr


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


def test_unknown_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    from tools import predict as cli

    rc = cli.main(["--bson", str(trained["raw"] / "test.bson"), "--checkpoint", str(tmp_path / "missing.pt"),
                   "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "missing.pt: no such checkpoint" in capsys.readouterr().err


def test_tiled_models_change_only_products_with_their_image_count(trained, tmp_path, capsys):
    # The demo checkpoint is fully convolutional, so it can stand in for a tiled model of any K.
    base, _ = predict(trained, tmp_path, capsys, "--probs", str(tmp_path / "base.npy"), name="base.csv")
    tiled, _ = predict(trained, tmp_path, capsys, "--tiled", f"2={trained['ckpt']}", "--tiled",
                       f"4={trained['ckpt']}", "--probs", str(tmp_path / "tiled.npy"), name="tiled.csv")
    pb, pt = np.load(tmp_path / "base.npy").astype(np.float32), np.load(tmp_path / "tiled.npy").astype(np.float32)
    k = np.array([len(d["imgs"]) for d in iter_products(str(trained["raw"] / "test.bson"))])
    assert [x["_id"] for x in rows(base)] == [x["_id"] for x in rows(tiled)]
    changed = np.abs(pb - pt).max(1) > 1e-3
    assert not changed[(k == 1) | (k == 3)].any()
    assert changed[(k == 2) | (k == 4)].all() and ((k == 2) | (k == 4)).sum() > 10


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
