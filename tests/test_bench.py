"""tools.bench: every mode runs a few steps on generated data and writes the agreed JSON keys."""
import json

import pytest

from tools import bench

ENV_KEYS = {"cpu_count", "torch", "dali", "batch", "threads", "gpu", "cuda", "python"}


def run_mode(tmp_path, *args):
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert ENV_KEYS <= set(res["env"]) and res["env"]["cpu_count"] >= 1 and res["env"]["dali"]
    return res


def test_loader(data_dir, tmp_path):
    res = run_mode(tmp_path, "loader", "--data", str(data_dir), "--batch", "16", "--threads", "1",
                   "--seconds", "1", "--warmup", "2")
    assert res["mode"] == "loader" and res["backend"] == "dali-cpu"
    assert res["images_per_s"] > 0 and 0 < res["batch_ms_p50"] <= res["batch_ms_p99"]
    assert res["env"]["batch"] == 16 and res["env"]["threads"] == 1


def test_baseline(data_dir, tmp_path):
    res = run_mode(tmp_path, "baseline", "--data", str(data_dir), "--batch", "16", "--threads", "1",
                   "--seconds", "1", "--images", "64")
    assert res["mode"] == "baseline"
    assert res["pil_dataloader"]["images_per_s"] > 0 and res["bare_decode"]["images_per_s"] > 0
    assert res["bare_decode"]["per_core_images_per_s"] == pytest.approx(res["bare_decode"]["images_per_s"])


def test_train_real_and_synthetic_in_one_run(data_dir, tmp_path):
    res = run_mode(tmp_path, "train", "--model", "tiny", "--data", str(data_dir), "--synthetic", "--amp", "off",
                   "--batch", "8", "--crop", "64", "--steps", "3", "--warmup", "1", "--threads", "1")
    assert res["mode"] == "train" and res["model"] == "tiny"
    real, syn = res["real"], res["synthetic"]
    assert real["images_per_s"] > 0 and syn["images_per_s"] > 0 and 0 <= real["data_wait_share"] < 1
    assert res["real_over_synthetic"] == pytest.approx(real["images_per_s"] / syn["images_per_s"])
    assert res["num_classes"] == 8


def test_train_synthetic_only(tmp_path):
    res = run_mode(tmp_path, "train", "--model", "tiny", "--synthetic", "--amp", "bf16", "--batch", "4",
                   "--crop", "64", "--steps", "2", "--warmup", "1", "--classes", "10")
    assert "real" not in res and "real_over_synthetic" not in res and res["synthetic"]["images_per_s"] > 0


def test_predict(trained_demo, tmp_path):
    from tools import repack

    test_data = tmp_path / "T"
    assert repack.main(["--bson", str(trained_demo["raw"] / "test.bson"), "--unlabelled", "--out", str(test_data),
                        "--quiet"]) == 0
    res = run_mode(tmp_path, "predict", "--data", str(test_data), "--checkpoint", trained_demo["ckpt"],
                   "--batch", "32", "--threads", "1")
    assert res["mode"] == "predict" and res["images_per_s"] > 0 and res["products_per_s"] > 0
    assert res["images_per_s"] >= res["products_per_s"]  # at least one image per product


def test_repack(synthetic_dir, tmp_path):
    res = run_mode(tmp_path, "repack", "--bson", str(synthetic_dir / "train.bson"), "--categories",
                   str(synthetic_dir / "category_names.csv"), "--workers", "1", "2", "--tmp", str(tmp_path))
    scan = res["bare_scan"]["mb_per_s"]
    for w in (1, 2):
        r = res[f"workers_{w}"]
        assert r["mb_per_s"] > 0 and r["per_core_over_bare_scan"] == pytest.approx(r["mb_per_s"] / w / scan)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["loader", "--data", str(tmp_path / "nope"), "--seconds", "1"]) == 2
    assert "no such directory" in capsys.readouterr().err
