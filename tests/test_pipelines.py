"""DALI pipelines in CPU mode on generated data: uint8 pixels against a PIL reference, labels and ids, tiling."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from dali_pipes.config import DataConfig
from dali_pipes.dataset import open_dataset
from dali_pipes.pipelines import build_pipeline, graph_name, output_names
from dali_pipes.records import read_examples

TOL = 2.0  # pixel levels: libjpeg-turbo in DALI and in PIL may round the IDCT/upsampling differently


def _ref(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def _pixels(img: np.ndarray) -> np.ndarray:
    """A pipeline picture: uint8 HWC, as float for comparisons."""
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    return img.astype(np.float32)


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


_BUILD_ARGS = ("flip", "device_id", "seed", "shard_id", "num_shards", "checkpoint", "with_params", "resize_check")

# The two CPU graphs: with the per-picture size check (whole decode, then crop_mirror_normalize, as on the GPU)
# and without it, where the window decoder (dali_pipes.native) decodes each window straight into the batch.
GRAPHS = pytest.mark.parametrize("resize_check", [True, False], ids=["check", "window"])


def _pipe(ds, split, k=0, **kw):
    """A pipeline over ``split``; ``kw`` are build_pipeline arguments or DataConfig fields."""
    paths, idxs, _ = ds.shards(split, k)
    build = {k_: kw.pop(k_) for k_ in list(kw) if k_ in _BUILD_ARGS}
    train = kw.pop("train", split == "train")
    cfg = DataConfig(**dict(dict(backend="dali-cpu", batch_size=32, num_threads=2, seed=11, prefetch=2, crop=160,
                                 image_size=180, initial_fill=64, tiled_k=k), **kw))
    return build_pipeline(cfg, paths=paths, index_paths=idxs, train=train, **build)


def _names(k=0, with_params=False):
    return output_names(k, with_params)


def _epoch(pipe, n, names):
    """The first ``n`` samples the pipeline yields, as {name: array}."""
    out = {k_: [] for k_ in names}
    got = 0
    while got < n:
        for k_, v in zip(names, pipe.run()):
            out[k_].append(np.array((v.as_cpu() if hasattr(v, "as_cpu") else v).as_tensor()))
        got += len(out["images"][-1])
    return {k_: np.concatenate(v)[:n] for k_, v in out.items()}


def test_the_cpu_graph_without_the_size_check_is_the_window_decoder(ds):
    """The all-square CPU graph runs this project's window decoder (built here: the test machine has g++ and
    libjpeg's headers), which DALI's serialized graph names; with the size check it is DALI's own decoder."""
    cfg = DataConfig(backend="dali-cpu")
    assert graph_name(cfg, resize_check=False) == "window-decode"
    assert b"WindowDecode" in _pipe(ds, "train", resize_check=False).serialize()
    assert b"WindowDecode" not in _pipe(ds, "train", resize_check=True).serialize()


@GRAPHS
def test_train_pixels_labels_ids_for_a_whole_epoch(ds, image_records, resize_check):
    """Every sample of a train epoch is the random crop (position and flip read back) of its own record,
    with that record's label, within JPEG decoder tolerance; the epoch is the split once."""
    n = ds.num_records("train")
    names = _names(0, True)
    out = _epoch(_pipe(ds, "train", with_params=True, resize_check=resize_check), n, names)
    keys = list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist()))
    assert len(set(keys)) == n  # shuffled, but each record once
    mirrored = 0
    for i, key in enumerate(keys):
        rec = image_records[key]
        assert out["labels"][i, 0] == rec["label"]
        px, py, m = out["crop_x"][i, 0], out["crop_y"][i, 0], out["mirror"][i, 0]
        want = _window(_ref(rec["image"]), px, py, bool(m), 160)
        got = _pixels(out["images"][i])
        assert np.abs(got - want).max() <= TOL, f"sample {i} {key}"
        mirrored += int(m)
    assert 0.3 * n < mirrored < 0.7 * n  # the flip is random
    assert out["crop_x"].std() > 0.2 and out["crop_y"].std() > 0.2  # so are the positions
    order = [k[0] for k in keys]
    assert order != sorted(order)  # shuffled


@GRAPHS
@pytest.mark.parametrize("flip,eval_crop", [(False, True), (True, True), (False, False)])
def test_eval_centre_crop_flip_and_full_image(ds, image_records, flip, eval_crop, resize_check):
    n = ds.num_records("val")
    names = _names(0, False)
    out = _epoch(_pipe(ds, "val", flip=flip, eval_crop=eval_crop, resize_check=resize_check), n, names)
    keys = list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist()))
    assert len(set(keys)) == n
    size = 160 if eval_crop else 180
    assert out["images"].shape == (n, size, size, 3) and out["images"].dtype == np.uint8
    for i in range(0, n, 7):
        rec = image_records[keys[i]]
        assert out["labels"][i, 0] == rec["label"]
        want = _window(_ref(rec["image"]), 0.5, 0.5, flip, size)
        assert np.abs(_pixels(out["images"][i]) - want).max() <= TOL


def test_eval_keeps_file_order(ds):
    """No shuffle in eval: records come in shard order, so a product's images arrive together."""
    want = [(r["product_id"], r["image_index"]) for p in ds.shards("val")[0] for r in read_examples(p)]
    out = _epoch(_pipe(ds, "val"), len(want), output_names(0))
    assert list(zip(out["product_id"][:, 0].tolist(), out["image_index"][:, 0].tolist())) == want


@GRAPHS
@pytest.mark.parametrize("k,hw", [(2, (160, 320)), (3, (160, 480)), (4, (320, 320))])
def test_tiled_sizes_and_tiles(ds, k, hw, resize_check):
    """Eval tiles, flipped (TTA): each tile is its own picture's mirrored centre crop, in its place."""
    recs = [r for p in ds.shards("val", k)[0] for r in read_examples(p)]
    n = min(len(recs), 8)
    assert n > 0
    out = _epoch(_pipe(ds, "val", k, flip=True, resize_check=resize_check), n, _names(k, False))
    h, w = hw
    assert out["images"].shape == (n, h, w, 3)
    for i in range(n):
        rec = recs[i]
        assert out["product_id"][i, 0] == rec["product_id"] and out["labels"][i, 0] == rec["label"]
        pic = _pixels(out["images"][i])
        for t in range(k):
            y0, x0 = (160 * (t // 2), 160 * (t % 2)) if k == 4 else (0, 160 * t)
            want = _window(_ref(rec[f"image_{t}"]), 0.5, 0.5, True, 160)
            assert np.abs(pic[y0:y0 + 160, x0:x0 + 160] - want).max() <= TOL, (k, i, t)


@GRAPHS
@pytest.mark.parametrize("k", [2, 4])
def test_tiled_train_crops_each_tile(ds, k, resize_check):
    """Train tiles: each tile is its own image's random crop and flip, in its place (strip or 2x2 grid)."""
    recs = {r["product_id"]: r for p in ds.shards("train", k)[0] for r in read_examples(p)}
    n = min(8, ds.num_records("train", k))
    out = _epoch(_pipe(ds, "train", k, with_params=True, resize_check=resize_check), n,
                 _names(k, True))
    assert out["crop_x"].shape == (n, k) and 0 < out["mirror"].sum() < n * k  # some tiles mirrored, not all
    for i in range(n):
        rec = recs[int(out["product_id"][i, 0])]
        pic = _pixels(out["images"][i])
        for t in range(k):
            y0, x0 = (160 * (t // 2), 160 * (t % 2)) if k == 4 else (0, 160 * t)
            want = _window(_ref(rec[f"image_{t}"]), out["crop_x"][i, t], out["crop_y"][i, t],
                           bool(out["mirror"][i, t]), 160)
            assert np.abs(pic[y0:y0 + 160, x0:x0 + 160] - want).max() <= TOL


def test_output_dtype(ds):
    out = _epoch(_pipe(ds, "val"), 4, output_names(0))
    assert out["images"].dtype == np.uint8 and out["images"].shape == (4, 160, 160, 3)
    assert out["labels"].dtype == np.int64 and out["product_id"].dtype == np.int64


def test_same_seed_same_draws_other_seed_other_draws(ds):
    names = output_names(0, with_params=True)
    a = _epoch(_pipe(ds, "train", with_params=True), 32, names)
    b = _epoch(_pipe(ds, "train", with_params=True), 32, names)
    c = _epoch(_pipe(ds, "train", with_params=True, seed=12), 32, names)
    assert np.array_equal(a["crop_x"], b["crop_x"]) and np.array_equal(a["product_id"], b["product_id"])
    assert not np.array_equal(a["crop_x"], c["crop_x"])


def test_bad_arguments(ds):
    with pytest.raises(ValueError, match="dali-cpu or dali-gpu"):
        _pipe(ds, "val", backend="synthetic")
    with pytest.raises(ValueError, match="device_id"):
        _pipe(ds, "val", backend="dali-gpu")
    with pytest.raises(ValueError, match="train pipelines only"):
        _pipe(ds, "val", with_params=True)


# ---- pictures of other sizes: the shorter side is resized to image_size before the crop ---------------------
def _gradient(w: int, h: int, seed: int) -> Image.Image:
    """A smooth picture whose values tell positions apart: red grows along x, green along y."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 20 + 215 * x
    img[..., 1] = 30 + 200 * y
    img[..., 2] = 60 + 120 * x * (1 - y) + rng.uniform(0, 10)
    return Image.fromarray(np.round(np.broadcast_to(img, (h, w, 3))).astype(np.uint8))


def _jpeg(img: Image.Image, orientation: int = 0) -> bytes:
    buf = io.BytesIO()
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation
        img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    else:
        img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


# product id -> its pictures: 1x1, 400x300 (landscape), 120x180 (portrait), a 120x180 stored picture that EXIF
# turns to 180x120, 180x180 (untouched), 800x600 (downscaled), and a product of two odd pictures (products/k2)
ODD = {1: [_jpeg(Image.new("RGB", (1, 1), (200, 40, 90)))],
       2: [_jpeg(_gradient(400, 300, 2))],
       3: [_jpeg(_gradient(120, 180, 3))],
       4: [_jpeg(_gradient(120, 180, 4), orientation=6)],
       5: [_jpeg(_gradient(180, 180, 5))],
       6: [_jpeg(_gradient(800, 600, 6))],
       7: [_jpeg(_gradient(400, 300, 7)), _jpeg(_gradient(120, 180, 8))]}


def _resized_ref(jpeg: bytes, side: int = 180) -> np.ndarray:
    """PIL's view of the same rule: EXIF orientation applied, shorter side resized to ``side`` (bilinear,
    antialiased when shrinking), aspect ratio kept (both sides are exact integers for the pictures above)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))).convert("RGB")
    w, h = img.size
    s = side / min(w, h)
    return np.asarray(img.resize((round(w * s), round(h * s)), Image.BILINEAR), np.float32)


@pytest.fixture(scope="module")
def odd_ds(tmp_path_factory):
    from tests.test_repack import CAT0, write_bson, write_cats
    from dali_pipes.writer.repack import repack

    tmp = tmp_path_factory.mktemp("odd")
    docs = [{"_id": pid, "category_id": CAT0, "imgs": [{"picture": j} for j in jpegs]} for pid, jpegs in ODD.items()]
    out = str(tmp / "DATA")
    m = repack(write_bson(tmp / "odd.bson", docs), out, categories=write_cats(tmp / "cats.csv", [CAT0]),
               val_fraction=0.0, workers=1, progress=False)
    assert m["counts"]["images_written"] == sum(len(v) for v in ODD.values())  # none refused
    return open_dataset(out)


def _odd_epoch(odd_ds, k=0, **kw):
    n = odd_ds.num_records("train", k)
    out = _epoch(_pipe(odd_ds, "train", k, batch_size=4, train=False, **kw), n, output_names(k))
    return out, n


@pytest.mark.parametrize("eval_crop", [True, False])
def test_odd_sizes_are_resized_then_cropped(odd_ds, eval_crop):
    """Every picture's shorter side becomes 180 with its aspect ratio kept, EXIF orientation applied, before
    the centre crop (160) or the whole-image square (180): the same pixels as PIL's resize within a level or
    so (the two resamplers round differently), the 180x180 picture as it is."""
    out, n = _odd_epoch(odd_ds, eval_crop=eval_crop)
    size = 160 if eval_crop else 180
    assert n == 8 and out["images"].shape == (n, size, size, 3)
    for i in range(n):
        pid, index = int(out["product_id"][i, 0]), int(out["image_index"][i, 0])
        jpeg = ODD[pid][index]
        want = _window(_resized_ref(jpeg), 0.5, 0.5, False, size)
        diff = np.abs(_pixels(out["images"][i]) - want)
        if pid == 5:
            assert diff.max() <= TOL  # the right size already: not resampled
        assert diff.mean() < 0.5 and diff.max() <= 4, (pid, index, diff.mean(), diff.max())  # measured: 0.22, 1


def test_odd_sizes_train_crops_and_tiles(odd_ds):
    """Train: the random window is taken in the resized picture; tiles are resized one by one."""
    out = _epoch(_pipe(odd_ds, "train", batch_size=4, with_params=True, seed=3), 8, output_names(0, True))
    assert sorted(out["product_id"][:, 0].tolist()) == [1, 2, 3, 4, 5, 6, 7, 7]
    for i in range(8):
        jpeg = ODD[int(out["product_id"][i, 0])][int(out["image_index"][i, 0])]
        want = _window(_resized_ref(jpeg), out["crop_x"][i, 0], out["crop_y"][i, 0], bool(out["mirror"][i, 0]), 160)
        assert np.abs(_pixels(out["images"][i]) - want).mean() < 0.5
    tiled, n = _odd_epoch(odd_ds, 2)
    assert n == 1 and tiled["images"].shape == (1, 160, 320, 3)
    for t in range(2):
        want = _window(_resized_ref(ODD[7][t]), 0.5, 0.5, False, 160)
        assert np.abs(_pixels(tiled["images"][0])[:, 160 * t:160 * (t + 1)] - want).mean() < 0.5


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
@pytest.mark.parametrize("eval_crop", [True, False])
def test_odd_sizes_on_the_gpu(odd_ds, eval_crop):
    """The same resize rule in the GPU graph (decode on the GPU, resize and crop there too)."""
    out, n = _odd_epoch(odd_ds, backend="dali-gpu", device_id=0, eval_crop=eval_crop)
    size = 160 if eval_crop else 180
    assert n == 8 and out["images"].shape == (n, size, size, 3)
    for i in range(n):
        pid, index = int(out["product_id"][i, 0]), int(out["image_index"][i, 0])
        want = _window(_resized_ref(ODD[pid][index]), 0.5, 0.5, False, size)
        diff = np.abs(_pixels(out["images"][i]) - want)
        # nvJPEG upsamples chroma unlike libjpeg-turbo; on these smooth pictures that is a level or two
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, (pid, index, diff.mean(), diff.max())


def test_odd_sizes_through_the_loader(odd_ds):
    """The repack records the odd sizes in the manifest, so the loader keeps the resize check and resizes."""
    from dali_pipes.loader import build_loader

    assert odd_ds.picture_sizes("train") == {"120x180": 3, "400x300": 2, "180x180": 1, "1x1": 1, "800x600": 1}
    cfg = DataConfig(path=odd_ds.root, backend="dali-cpu", batch_size=4, num_threads=2, image_size=180, crop=160)
    loader, steps = build_loader(cfg, 0, 1, "train", augment=False)
    assert loader.resize_check and steps == 2
    for images, _, meta in loader:
        for img, pid, index in zip(images.numpy(), meta["product_id"].tolist(), meta["image_index"].tolist()):
            want = _window(_resized_ref(ODD[pid][index]), 0.5, 0.5, False, 160)
            assert np.abs(_pixels(img) - want).mean() < 0.5, (pid, index)
