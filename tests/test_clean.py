"""Noisy-image cleaning: ``tools.clean`` scores every train image and lists the worst; ``tools.repack --exclude``
leaves exactly those out and lists them in quarantine.csv, the counts adding up."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dali_pipes.dataset import open_dataset, read_quarantine
from dali_pipes.records import read_examples
from tests.test_repack import CAT0, all_image_records, good_docs, write_bson, write_cats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ---- repack --exclude ----------------------------------------------------------------------------------
def test_repack_exclude_leaves_out_exactly_the_listed_images(tmp_path):
    # good_docs(12): product i has 1 + i % 4 images, 30 images in all
    docs = good_docs(12)
    src = write_bson(tmp_path / "in.bson", docs)
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    listed = [(1, 0), (3, 0), (3, 1), (3, 2), (3, 3), (4, 0), (7, 2), (999, 0)]  # 999: not in the file
    excl = _write_csv(tmp_path / "excluded.csv", ["product_id", "image_index", "category_id", "loss", "reason"],
                      [(p, j, CAT0, 9.5, "high loss under runs/r1") for p, j in listed])
    out = str(tmp_path / "D")
    r = subprocess.run([sys.executable, "-m", "tools.repack", "--bson", src, "--categories", cats, "--out", out,
                        "--val-fraction", "0.3", "--workers", "2", "--shard-size-mb", "0.01", "--quiet",
                        "--exclude", excl], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "excluded 7 of the 8 images listed" in r.stdout and "1 not found" in r.stdout
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["counts"] == {"products_read": 12, "products_written": 10, "products_quarantined": 2,
                           "images_read": 30, "images_written": 23, "images_quarantined": 7}
    assert m["exclude"] == {"file": "excluded.csv", "listed": 8, "images_excluded": 7, "not_matched": 1}
    # the image records: every image but the excluded ones
    written = {(rec["product_id"], rec["image_index"]) for _, rec in all_image_records(out, m)}
    every = {(d["_id"], j) for d in docs for j in range(len(d["imgs"]))}
    assert written == every - set(listed)
    nums = {rec["product_id"]: rec["num_images"] for _, rec in all_image_records(out, m)}
    assert nums[1] == 1 and nums[7] == 3
    # product 7 keeps its images 0, 1, 3 in the K=3 product records
    k3 = [rec for split in ("train", "val") for sh in m["products_k"]["3"][split]["shards"]
          for rec in read_examples(os.path.join(out, sh["path"])) if rec["product_id"] == 7]
    assert len(k3) == 1 and [k3[0][f"image_{i}"] for i in range(3)] == [docs[7]["imgs"][j]["picture"] for j in (0, 1, 3)]
    q = read_quarantine(out)
    image_rows = {(int(x["product_id"]), int(x["image_index"])): x["reason"] for x in q if x["image_index"]}
    assert image_rows == {k: "excluded: high loss under runs/r1" for k in listed if k[0] != 999}
    product_rows = {int(x["product_id"]): x["reason"] for x in q if not x["image_index"]}
    assert sorted(product_rows) == [3, 4] and all("excluded" in v for v in product_rows.values())


def test_repack_exclude_bad_list_is_a_clear_error(tmp_path):
    src = write_bson(tmp_path / "in.bson", good_docs(3))
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    bad = _write_csv(tmp_path / "bad.csv", ["product_id", "loss"], [(1, 2.0)])
    for path, msg in ((bad, "no column image_index"), (str(tmp_path / "none.csv"), "no such file")):
        r = subprocess.run([sys.executable, "-m", "tools.repack", "--bson", src, "--categories", cats, "--out",
                            str(tmp_path / "D"), "--quiet", "--exclude", path], cwd=ROOT, env=_env(),
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- tools.clean -------------------------------------------------------------------------------------------
def _random_checkpoint(data_dir, path, crop=64):
    """A checkpoint in the trainer's format holding an untrained tiny model (losses spread widely)."""
    from models import create_model
    from train import checkpoint
    from train.config import Config, to_dict

    ds = open_dataset(str(data_dir))
    cfg = Config()
    cfg.model.name, cfg.data.crop, cfg.data.path = "tiny", crop, str(data_dir)
    torch.manual_seed(0)
    model = create_model("tiny", ds.num_classes)
    checkpoint.save({"format": checkpoint.FORMAT, "status": "finished", "step": 0, "model": model.state_dict(),
                     "model_name": "tiny", "num_classes": ds.num_classes, "category_ids": ds.category_ids,
                     "config": to_dict(cfg), "best": {"metric": 0.0, "step": 0}}, str(path))
    return model.eval(), cfg


def _hand_losses(model, cfg, data_dir, ds):
    """Loss of every train image computed here: PIL decode, centre crop, the model on the picture and on its
    mirror (uint8 NHWC pixels, the loader's format), -log of the mean probability of the label."""
    import io

    crop = cfg.data.crop
    recs = [r for sh in ds.manifest["splits"]["train"]["shards"]
            for r in read_examples(os.path.join(str(data_dir), sh["path"]))]
    batch = []
    for r in recs:
        a = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        y0, x0 = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
        batch.append(a[y0:y0 + crop, x0:x0 + crop])
    x = torch.from_numpy(np.stack(batch))
    with torch.no_grad():
        p = (model(x).softmax(1) + model(x.flip(2)).softmax(1)) / 2
    labels = torch.tensor([r["label"] for r in recs])
    loss = -torch.log(p[torch.arange(len(recs)), labels])
    return {(r["product_id"], r["image_index"]): v for r, v in zip(recs, loss.tolist())}


def test_clean_lists_the_worst_fraction_by_loss(data_dir, tmp_path):
    ckpt = tmp_path / "r0" / "best.pt"
    os.makedirs(ckpt.parent)
    model, cfg = _random_checkpoint(data_dir, ckpt)
    ds = open_dataset(str(data_dir))
    n = ds.manifest["splits"]["train"]["images"]
    out, scores = tmp_path / "excluded.csv", tmp_path / "scores.csv"
    from tools import clean

    assert clean.main(["--data", str(data_dir), "--checkpoint", str(ckpt), "--drop-fraction", "0.1", "--out",
                       str(out), "--scores", str(scores), "--batch", "50", "--backend", "dali-cpu", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == round(0.1 * n)
    every = list(csv.DictReader(open(scores)))
    assert len(every) == n and len({(x["product_id"], x["image_index"]) for x in every}) == n  # each image once
    hand = _hand_losses(model, cfg, data_dir, ds)
    assert len(hand) == n
    # the losses clean reports are those computed by hand (DALI and PIL decode the JPEGs within rounding)
    for x in every:
        assert float(x["loss"]) == pytest.approx(hand[int(x["product_id"]), int(x["image_index"])], rel=2e-2, abs=2e-3)
    # the listed ones are the worst by the hand losses, worst first
    listed = [float(x["loss"]) for x in rows]
    assert listed == sorted(listed, reverse=True)
    keys = {(int(x["product_id"]), int(x["image_index"])) for x in rows}
    cut = min(hand[k] for k in keys)
    assert max(v for k, v in hand.items() if k not in keys) <= cut + 2e-2
    cats = ds.category_ids
    labels = {(rec["product_id"], rec["image_index"]): rec["label"] for _, rec in all_image_records(str(data_dir), ds.manifest)}
    for x in rows:
        key = (int(x["product_id"]), int(x["image_index"]))
        assert int(x["category_id"]) == cats[labels[key]]
        assert x["reason"] == f"high loss under {tmp_path / 'r0'}"
    assert int(rows[0]["predicted_category_id"]) in cats


def test_clean_refuses_a_tiled_model(data_dir, tmp_path, capsys):
    """clean scores single images: a checkpoint trained on tiled products (data.tiled_k 2) is one error line."""
    from train import checkpoint
    from tools import clean

    ckpt = tmp_path / "k2" / "best.pt"
    os.makedirs(ckpt.parent)
    _random_checkpoint(data_dir, ckpt)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["config"]["data"]["tiled_k"] = 2
    checkpoint.save(ck, str(ckpt))
    rc = clean.main(["--data", str(data_dir), "--checkpoint", str(ckpt), "--drop-fraction", "0.1", "--out",
                     str(tmp_path / "x.csv"), "--backend", "dali-cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"{ckpt}: trained with data.tiled_k 2" in err, err
    assert "need data.tiled_k 0" in err and not (tmp_path / "x.csv").exists()
