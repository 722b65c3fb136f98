"""Hierarchy heads (``model.aux_levels``): a linear head per category level on the pooled trunk features,
trained with its own cross-entropy; validation reports each level's product accuracy; the checkpoints load
for predict (the extra heads ignored) and as ``train.init_from``."""
import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dali_pipes.dataset import open_dataset
from dali_pipes.records import read_examples
from models import create_model, param_groups, without_aux
from tests.test_train_run import SMALL, records, run_sh
from train import checkpoint


def _levels_by_hand(synthetic_dir, category_ids):
    """class index -> level-1 and level-2 class, from category_names.csv: paths numbered in sorted order."""
    with open(synthetic_dir / "category_names.csv", newline="") as f:
        rows = {int(r["category_id"]): r for r in csv.DictReader(f)}
    l1 = [rows[c]["category_level1"] for c in category_ids]
    l2 = [rows[c]["category_level1"] + " > " + rows[c]["category_level2"] for c in category_ids]
    return ([sorted(set(l1)).index(v) for v in l1], [sorted(set(l2)).index(v) for v in l2])


def test_model_aux_heads_shapes_and_state_dict():
    m = create_model("tiny", 20, aux_classes={"level1": 3, "level2": 7})
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    m.eval()
    logits, aux = m(x, aux=True)
    assert logits.shape == (2, 20) and [a.shape for a in aux] == [(2, 3), (2, 7)]
    assert torch.equal(m(x), logits)  # plain forward: the class logits only
    keys = [k for k in m.state_dict() if k.startswith("aux_heads.")]
    assert keys == ["aux_heads.level1.weight", "aux_heads.level1.bias", "aux_heads.level2.weight",
                    "aux_heads.level2.bias"]
    new = {id(p) for p in param_groups(m)["new"]}
    assert all(id(p) in new for p in m.aux_heads.parameters())  # head-side learning rate
    plain = create_model("tiny", 20)
    plain.load_state_dict(without_aux(m.state_dict()))  # strict: exactly the plain model's keys
    assert plain(x, aux=True)[1] == []


@pytest.fixture(scope="module")
def aux_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("aux") / "RUN"
    p = run_sh("demo", "--data", data_dir, "--out", run, *SMALL, "train.max_steps=12", "model.aux_levels=[1, 2]",
               "optim.aux_weight=0.5", "data.image_size=180")  # no resize: the test crops the 180 images itself
    return run, p.stdout


def test_aux_heads_train_and_report_per_level_accuracy(aux_run, data_dir, synthetic_dir):
    run, stdout = aux_run
    ds = open_dataset(str(data_dir))
    lv1, lv2 = _levels_by_hand(synthetic_dir, ds.category_ids)
    ck = checkpoint.load(str(run / "last.pt"))
    sd = ck["model"]
    assert sd["aux_heads.level1.weight"].shape[0] == len(set(lv1))
    assert sd["aux_heads.level2.weight"].shape[0] == len(set(lv2))
    # the heads were trained: they moved away from the initial weights of the run (same seed)
    torch.manual_seed(ck["config"]["train"]["seed"])
    init = create_model("tiny", ds.num_classes, aux_classes={"level1": len(set(lv1)), "level2": len(set(lv2))})
    assert not torch.allclose(init.state_dict()["aux_heads.level1.weight"], sd["aux_heads.level1.weight"])
    assert not torch.allclose(init.state_dict()["aux_heads.level2.weight"], sd["aux_heads.level2.weight"])

    val = records(run, "val")[-1]
    assert "level1_acc" in val and "level2_acc" in val and "level1_acc" in stdout
    # the same accuracies computed here: PIL decode, centre crop, mean probability per product, argmax
    model = create_model("tiny", ds.num_classes, aux_classes={"level1": len(set(lv1)), "level2": len(set(lv2))})
    model.load_state_dict(sd)
    model.eval()
    crop = ck["config"]["data"]["crop"]
    recs = [r for sh in ds.manifest["splits"]["val"]["shards"] for r in read_examples(os.path.join(str(data_dir), sh["path"]))]
    pics = []
    for r in recs:
        a = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        y0, x0 = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
        pics.append(a[y0:y0 + crop, x0:x0 + crop])
    with torch.no_grad():
        _, (a1, a2) = model(torch.from_numpy(np.stack(pics)), aux=True)
    pids = [r["product_id"] for r in recs]
    products = sorted(set(pids))
    for name, logits, index in (("level1_acc", a1, lv1), ("level2_acc", a2, lv2)):
        probs = logits.softmax(1)
        right = 0
        for p in products:
            rows = [i for i, q in enumerate(pids) if q == p]
            right += int(probs[rows].mean(0).argmax()) == index[recs[rows[0]]["label"]]
        # DALI and PIL may decode a pixel differently: one product either way
        assert abs(val[name] - right / len(products)) <= 1.0 / len(products) + 1e-9, name


def test_aux_checkpoint_loads_for_predict(aux_run, test_data_dir, tmp_path):
    from tools import predict

    run, _ = aux_run
    ck = checkpoint.load(str(run / "last.pt"))
    plain = str(tmp_path / "plain.pt")  # the same weights without the heads, saved as a plain model's
    cfg = json.loads(json.dumps(ck["config"]))
    cfg["model"]["aux_levels"] = []
    checkpoint.save({**ck, "model": without_aux(ck["model"]), "config": cfg}, plain)
    subs = []
    for i, path in enumerate((str(run / "last.pt"), plain)):
        out = str(tmp_path / f"sub{i}.csv")
        assert predict.main(["--data", str(test_data_dir), "--checkpoint", path, "--out", out, "--backend",
                             "dali-cpu", "--quiet"]) == 0
        subs.append(open(out).read())
    assert subs[0] == subs[1] and len(subs[0].splitlines()) == 61  # header + 60 test products


def test_aux_checkpoint_as_init_from_and_back(aux_run, data_dir, tmp_path):
    run, _ = aux_run
    aux_ck = checkpoint.load(str(run / "last.pt"))
    # a plain model from the checkpoint with heads: the heads are left out
    plain = tmp_path / "plain"
    p = run_sh("demo", "--data", data_dir, "--out", plain, *SMALL, "train.max_steps=1",
               f"train.init_from={run / 'last.pt'}")
    assert f"init_from {run / 'last.pt'}" in p.stdout
    ck = checkpoint.load(str(plain / "last.pt"))
    assert not any(k.startswith("aux_heads.") for k in ck["model"])
    # one step at lr ~2e-4 from the loaded weights: close to them, far from a fresh model's
    assert torch.allclose(ck["model"]["fc.weight"], aux_ck["model"]["fc.weight"], atol=5e-3)
    # heads from a checkpoint without them: they start fresh, and say so
    back = tmp_path / "back"
    p = run_sh("demo", "--data", data_dir, "--out", back, *SMALL, "train.max_steps=1", "model.aux_levels=[2]",
               f"train.init_from={plain / 'last.pt'}")
    assert "no trained hierarchy head for level2" in p.stdout
    assert checkpoint.load(str(back / "last.pt"))["model"]["aux_heads.level2.weight"].shape == \
        aux_ck["model"]["aux_heads.level2.weight"].shape
