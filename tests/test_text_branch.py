"""The OCR text branch (``model.text_branch``): the model joins a picture's words to its head, the loader hands
each batch the words of its own pictures (through a resume too), and training, predict and ``tools.clean``
use it end to end on generated book covers read by the real OCR (the `ocr` extra, which `make test` installs)."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dali_pipes.config import DataConfig
from dali_pipes.dataset import open_dataset
from dali_pipes.loader import build_loader
from dali_pipes.ocr_files import HASHING, TextLookup, open_ocr
from models import create_model
from tests.test_ocr import engine
from tests.test_train_run import ROOT, env, run_sh
from train import checkpoint

SET = dict(products=80, test_products=16, categories=4, seed=5, text_categories=2)


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    """Generated covers (2 text categories of 4), repacked (train/val and the unlabelled test), with their
    OCR (``tools.ocr``, default units) in DATA/ocr; DATA_TEST has none."""
    from dali_pipes.writer.repack import repack
    from tools import ocr, synthetic

    root = tmp_path_factory.mktemp("text_set")
    raw = root / "raw"
    synthetic.make_dataset(str(raw), **SET)
    data = root / "DATA"
    repack(str(raw / "train.bson"), str(data), categories=str(raw / "category_names.csv"), val_fraction=0.2,
           progress=False)
    test = root / "DATA_TEST"
    repack(str(raw / "test.bson"), str(test), unlabelled=True, progress=False)
    ocr.run_ocr(str(data), progress=False)
    return {"raw": raw, "data": data, "test": test}


# ---- the model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["first", "vgg", "linear"])
def test_the_branch_starts_silent_and_its_words_reach_the_class_head(head):
    """A new branch adds nothing (a fine-tune from a model without one starts where that model was) and leaves
    the other weights as the same seed gives them; trained, the words alone tell the classes apart, so they
    reach the logits through the head."""
    kw = {"vgg_width": 32, "vgg_dropout": 0.0} if head == "vgg" else {}
    spec = {"buckets": 64, "dim": 8}
    torch.manual_seed(0)
    model = create_model("tiny", 4, head=head, text_branch=spec, **kw)
    torch.manual_seed(0)
    plain = create_model("tiny", 4, head=head, **kw)
    # the same seed gives the same weights beside the branch: the two compare on the branch alone
    theirs = model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in plain.state_dict().items())
    assert {k.split(".")[0] for k in set(theirs) - set(plain.state_dict())} == {"text_branch"}
    model.eval(), plain.eval()
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    # picture i carries the words {i % 4 + 1, 10 + i % 4}; picture 7 has none (an empty bag)
    words = [[i % 4 + 1, 10 + i % 4] for i in range(7)] + [[]]
    ids = torch.tensor([w for ws in words for w in ws])
    offsets = torch.tensor(np.cumsum([0] + [len(ws) for ws in words[:-1]]))
    with torch.no_grad():
        assert torch.equal(model(x, text=(ids, offsets)), plain(x))
    with pytest.raises(ValueError, match="has a text branch"):
        model(x)
    with pytest.raises(ValueError, match="has no text branch"):
        plain(x, text=(ids, offsets))

    # the same picture everywhere: only the words tell the labels i % 4 apart
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    labels = torch.tensor([i % 4 for i in range(8)])
    # trained in eval mode: BatchNorm's running statistics stay put, so what is learnt is what eval shows
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(same, text=(ids, offsets)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(same, text=(ids, offsets)).argmax(1)
    assert torch.equal(pred[:7], labels[:7]), pred


# ---- the loader ------------------------------------------------------------------------------------------
def _cfg(data, **kw):
    return DataConfig(path=str(data), backend="dali-cpu", batch_size=16, crop=64, num_threads=1, **kw)


def _expected(look, pids, index):
    ids, offsets = look.batch(np.asarray(pids), np.asarray(index))
    return ids.tolist(), offsets.tolist()


@engine
def test_each_batch_carries_the_words_of_its_own_pictures_through_a_resume(text_set):
    ds = open_dataset(str(text_set["data"]))
    look = TextLookup(open_ocr(ds, "train"))
    loader, spe = build_loader(_cfg(text_set["data"]), 0, 1, "train", text=True)
    loader.keep_ids = True
    assert loader.text_hashing == HASHING
    got, state = [], None
    for step, (images, labels, (ids, offsets)) in enumerate(loader):
        assert len(offsets) == images.shape[0] == 16
        got.append((loader.last_ids[0].tolist(), ids.tolist(), offsets.tolist()))
        assert (ids.tolist(), offsets.tolist()) == _expected(look, *loader.last_ids)
        if step == 0:
            state = loader.state()
    assert spe >= 3 and sum(len(g[1]) > 0 for g in got) >= 2  # several batches, covers among them
    # resumed after its first batch: the same pictures with the same words
    again, _ = build_loader(_cfg(text_set["data"]), 0, 1, "train", state=state, text=True)
    again.keep_ids = True
    rest = [(again.last_ids[0].tolist(), ids.tolist(), offsets.tolist()) for _, _, (ids, offsets) in again]
    assert rest == got[1:]

    # evaluation: meta["text"]; a tiled record (image_index -1) joins the words of its pictures
    val = TextLookup(open_ocr(ds, "val"))
    for k in (0, 2):
        ev, _ = build_loader(_cfg(text_set["data"], tiled_k=k), 0, 1, "val", text=True)
        n = 0
        for _, _, meta in ev:
            ids, offsets = meta["text"]
            assert (meta["image_index"] < 0).all().item() == bool(k)
            assert (ids.tolist(), offsets.tolist()) == _expected(val, meta["product_id"], meta["image_index"])
            n += len(offsets)
        assert n == ds.num_records("val", k)


# ---- end to end ------------------------------------------------------------------------------------------
def _tool(*args):
    return subprocess.run(["python", "-m", *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)


def _error_line(p):
    lines = [ln for ln in p.stderr.splitlines() if re.match(r"(\w+: )?error: ", ln)]  # not torchrun's report
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


@engine
def test_trains_predicts_and_cleans_with_the_words(text_set, tmp_path):
    data, test, raw = text_set["data"], text_set["test"], text_set["raw"]
    small = ["--data", data, "data.crop=64", "data.batch_size=8", "data.num_threads=1", "train.amp=off",
             "train.tensorboard=false", "early_stop.after_epoch=null", "train.max_steps=4"]
    image_run, text_run = tmp_path / "img", tmp_path / "txt"
    run_sh("demo", "--out", image_run, *small)
    p = run_sh("demo", "--out", text_run, *small, "model.text_branch=true", "model.text_dim=16",
               f"train.init_from={image_run / 'last.pt'}")
    assert f"text branch: the words tools.ocr read, from {data}/ocr" in p.stdout
    assert "no text branch: the text branch starts fresh" in p.stdout
    ck = checkpoint.load(str(text_run / "last.pt"))
    assert ck["text_hashing"] == HASHING and ck["text_ocr"] == {"det_size": 192, "angle_cls": False}
    assert ck["model"]["text_branch.embed.weight"].shape == (HASHING["buckets"], 16)
    assert f"init_from {image_run / 'last.pt'}: model weights of step 4" in p.stdout  # the rest is loaded
    assert ck["model"]["text_branch.out.weight"].abs().sum() > 0  # the branch trained from its silent start

    # a run with a text branch and no DATA/ocr: one error line with the command that makes it
    bare = tmp_path / "BARE"
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("ocr"))
    p = run_sh("demo", "--out", tmp_path / "bare_run", *small[2:], "--data", bare, "model.text_branch=true",
               check=False)
    assert f"python -m tools.ocr --data {bare}" in _error_line(p)

    # predict --bson runs the OCR on its own repack; the text member sits in an ensemble beside an image one
    sub = tmp_path / "sub.csv"
    p = _tool("tools.predict", "--bson", raw / "test.bson", "--checkpoint", text_run / "last.pt", "--checkpoint",
              image_run / "last.pt", "--tta", "flip", "--device", "cpu", "--threads", "1", "--out", sub, "--quiet")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "has a text branch: reading the text of the test pictures" in p.stderr and "projected" in p.stderr
    assert "text branch: the words of the test pictures" in p.stdout
    assert len(sub.read_text().splitlines()) == SET["test_products"] + 1

    # --data without its OCR: one line naming the command; with it, the same rows as --bson gave
    p = _tool("tools.predict", "--data", test, "--checkpoint", text_run / "last.pt", "--device", "cpu",
              "--out", tmp_path / "no.csv")
    assert f"python -m tools.ocr --data {test}" in _error_line(p)
    assert _tool("tools.ocr", "--data", test, "--quiet").returncode == 0
    sub2 = tmp_path / "sub2.csv"
    p = _tool("tools.predict", "--data", test, "--checkpoint", text_run / "last.pt", "--checkpoint",
              image_run / "last.pt", "--tta", "flip", "--device", "cpu", "--threads", "1", "--out", sub2, "--quiet")
    assert p.returncode == 0 and f"text branch: the words of {test}/ocr" in p.stdout, p.stderr[-2000:]
    assert sub2.read_text() == sub.read_text()
    # a checkpoint whose words were hashed otherwise: refused by name
    other = tmp_path / "other_hashing.pt"
    ck2 = checkpoint.load(str(text_run / "last.pt"))
    checkpoint.save({**ck2, "text_hashing": {**ck2["text_hashing"], "ngrams": [2, 3]}}, str(other))
    p = _tool("tools.predict", "--data", test, "--checkpoint", other, "--device", "cpu", "--out", tmp_path / "h.csv")
    assert "its text branch was trained on words hashed as" in _error_line(p) and f"{test}/ocr" in p.stderr
    # a torn OCR unit: named, with what to do
    unit = next(os.path.join(r, f) for r, _, fs in os.walk(test / "ocr") for f in fs if f.endswith(".npz"))
    with open(unit, "r+b") as f:
        f.truncate(64)
    p = _tool("tools.predict", "--data", test, "--checkpoint", text_run / "last.pt", "--device", "cpu",
              "--out", tmp_path / "torn.csv")
    assert os.path.basename(unit) in _error_line(p) and "not a readable OCR unit" in p.stderr

    # tools.clean scores the train images with their words
    p = _tool("tools.clean", "--data", data, "--checkpoint", text_run / "last.pt", "--drop-fraction", "0.1",
              "--device", "cpu", "--threads", "1", "--out", tmp_path / "excluded.csv")
    assert p.returncode == 0 and f"text branch: the words of {data}/ocr" in p.stderr, p.stderr[-2000:]
