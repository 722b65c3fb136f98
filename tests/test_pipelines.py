"""DALI pipelines in CPU mode on generated data: pixels against a PIL reference, labels and ids, tiling."""
import io

import numpy as np
import pytest
from PIL import Image

from dali_pipes.dataset import open_dataset
from dali_pipes.pipelines import build_pipeline, output_names
from dali_pipes.records import read_examples

MEAN = [123.0, 117.0, 104.0]
STD = [58.0, 57.0, 57.5]
TOL = 2.0  # pixel levels: libjpeg-turbo in DALI and in PIL may round the IDCT/upsampling differently


def _ref(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def _pixels(img: np.ndarray, channels_last: bool) -> np.ndarray:
    """Normalized pipeline output back to HWC pixel values."""
    hwc = img if channels_last else img.transpose(1, 2, 0)
    return hwc.astype(np.float32) * np.array(STD, np.float32) + np.array(MEAN, np.float32)


def _window(ref: np.ndarray, px: float, py: float, mirror: bool, crop: int) -> np.ndarray:
    # DALI: anchor = round(pos * (size - crop)), halfway away from zero
    ax = int(np.floor(px * (ref.shape[1] - crop) + 0.5))
    ay = int(np.floor(py * (ref.shape[0] - crop) + 0.5))
    w = ref[ay:ay + crop, ax:ax + crop]
    return w[:, ::-1] if mirror else w


@pytest.fixture(scope="module")
def ds(data_dir):
    return open_dataset(str(data_dir))


@pytest.fixture(scope="module")
def image_records(ds):
    """(product_id, image_index) -> record, for the train and val image shards."""
    out = {}
    for split in ("train", "val"):
        for path in ds.shards(split)[0]:
            for r in read_examples(path):
                out[(r["product_id"], r["image_index"])] = r
    return out


def _pipe(ds, split, k=0, **kw):
    paths, idxs, _ = ds.shards(split, k)
    args = dict(paths=paths, index_paths=idxs, tiled_k=k, train=split == "train", decode_device="cpu",
                batch_size=32, num_threads=2, device_id=None, seed=11, prefetch=2, crop=160, image_size=180,
                mean=MEAN, std=STD, initial_fill=64)
    args.update(kw)
    return build_pipeline(**args)


def _epoch(pipe, n, names):
    """The first ``n`` samples the pipeline yields, as {name: array}."""
    out = {k: [] for k in names}
    got = 0
    while got < n:
        for k, v in zip(names, pipe.run()):
            out[k].append(np.asarray(v.as_tensor()))
        got += len(out[names[0]][-1])
    return {k: np.concatenate(v)[:n] for k, v in out.items()}


def test_train_pixels_labels_ids_for_a_whole_epoch(ds, image_records):
    """Every sample of a train epoch is the random crop (position and flip read back) of its own record,
    with that record's label, within JPEG decoder tolerance; the epoch is the split once."""
    n = ds.num_records("train")
    names = output_names(0, with_params=True)
    out = _epoch(_pipe(ds, "train", with_params=True), n, names)
    keys = list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist()))
    assert len(set(keys)) == n  # shuffled, but each record once
    mirrored = 0
    for i, key in enumerate(keys):
        rec = image_records[key]
        assert out["labels"][i, 0] == rec["label"]
        px, py, m = out["crop_x"][i, 0], out["crop_y"][i, 0], out["mirror"][i, 0]
        want = _window(_ref(rec["image"]), px, py, bool(m), 160)
        got = _pixels(out["images"][i], channels_last=False)
        assert np.abs(got - want).max() <= TOL, f"sample {i} {key}"
        mirrored += int(m)
    assert 0.3 * n < mirrored < 0.7 * n  # the flip is random
    assert out["crop_x"].std() > 0.2 and out["crop_y"].std() > 0.2  # so are the positions
    order = [k[0] for k in keys]
    assert order != sorted(order)  # shuffled


@pytest.mark.parametrize("flip,eval_crop,channels_last", [(False, True, False), (True, True, True),
                                                           (False, False, False)])
def test_eval_centre_crop_flip_and_full_image(ds, image_records, flip, eval_crop, channels_last):
    n = ds.num_records("val")
    names = output_names(0)
    out = _epoch(_pipe(ds, "val", flip=flip, eval_crop=eval_crop, channels_last=channels_last), n, names)
    keys = list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist()))
    assert len(set(keys)) == n
    size = 160 if eval_crop else 180
    assert out["images"].shape == ((n, size, size, 3) if channels_last else (n, 3, size, size))
    for i in range(0, n, 7):
        rec = image_records[keys[i]]
        assert out["labels"][i, 0] == rec["label"]
        want = _window(_ref(rec["image"]), 0.5, 0.5, flip, size)
        assert np.abs(_pixels(out["images"][i], channels_last) - want).max() <= TOL


def test_eval_keeps_file_order(ds):
    """No shuffle in eval: records come in shard order, so a product's images arrive together."""
    want = [(r["product_id"], r["image_index"]) for p in ds.shards("val")[0] for r in read_examples(p)]
    out = _epoch(_pipe(ds, "val"), len(want), output_names(0))
    assert list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist())) == want


@pytest.mark.parametrize("k,hw", [(2, (160, 320)), (3, (160, 480)), (4, (320, 320))])
def test_tiled_sizes_and_tiles(ds, k, hw):
    recs = [r for p in ds.shards("val", k)[0] for r in read_examples(p)]
    n = min(len(recs), 8)
    assert n > 0
    for channels_last in (False, True):
        out = _epoch(_pipe(ds, "val", k, channels_last=channels_last), n, output_names(k))
        h, w = hw
        assert out["images"].shape == ((n, h, w, 3) if channels_last else (n, 3, h, w))
        for i in range(n):
            rec = recs[i]
            assert out["product_id"][i, 0] == rec["product_id"] and out["labels"][i, 0] == rec["label"]
            pic = _pixels(out["images"][i], channels_last)
            for t in range(k):
                y0, x0 = (160 * (t // 2), 160 * (t % 2)) if k == 4 else (0, 160 * t)
                want = _window(_ref(rec[f"image_{t}"]), 0.5, 0.5, False, 160)
                assert np.abs(pic[y0:y0 + 160, x0:x0 + 160] - want).max() <= TOL, (k, i, t)


def test_tiled_train_crops_each_tile(ds):
    """Train tiles: each tile is its own image's random crop and flip."""
    k = 2
    recs = {r["product_id"]: r for p in ds.shards("train", k)[0] for r in read_examples(p)}
    out = _epoch(_pipe(ds, "train", k, with_params=True), 8, output_names(k, with_params=True))
    assert out["crop_x"].shape == (8, k)
    for i in range(8):
        rec = recs[int(out["product_id"][i, 0])]
        pic = _pixels(out["images"][i], False)
        for t in range(k):
            want = _window(_ref(rec[f"image_{t}"]), out["crop_x"][i, t], out["crop_y"][i, t],
                           bool(out["mirror"][i, t]), 160)
            assert np.abs(pic[:, 160 * t:160 * (t + 1)] - want).max() <= TOL


@pytest.mark.parametrize("dtype,np_dtype", [("float16", np.float16), ("float32", np.float32)])
def test_output_dtype(ds, dtype, np_dtype):
    out = _epoch(_pipe(ds, "val", dtype=dtype), 4, output_names(0))
    assert out["images"].dtype == np_dtype
    assert out["labels"].dtype == np.int64 and out["product_id"].dtype == np.int64


def test_same_seed_same_draws_other_seed_other_draws(ds):
    names = output_names(0, with_params=True)
    a = _epoch(_pipe(ds, "train", with_params=True), 32, names)
    b = _epoch(_pipe(ds, "train", with_params=True), 32, names)
    c = _epoch(_pipe(ds, "train", with_params=True, seed=12), 32, names)
    assert np.array_equal(a["crop_x"], b["crop_x"]) and np.array_equal(a["product_id"], b["product_id"])
    assert not np.array_equal(a["crop_x"], c["crop_x"])


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="decode_device"):
        _pipe(ds, "val", decode_device="gpu")
    with pytest.raises(ValueError, match="device_id"):
        _pipe(ds, "val", decode_device="mixed")
    with pytest.raises(ValueError, match="train pipelines only"):
        _pipe(ds, "val", with_params=True)
