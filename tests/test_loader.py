"""build_loader on generated data (dali-cpu and synthetic): sharding, last batch, resume, errors, memory."""
import collections
import gc
import io
import os
import shutil

import numpy as np
import pytest
import torch

from dali_pipes.config import DataConfig
from dali_pipes.dataset import DatasetError, open_dataset
from dali_pipes.loader import build_loader, shard_range
from dali_pipes.pipelines import build_pipeline
from dali_pipes.records import read_examples


def _cfg(data_dir, **kw):
    args = dict(path=str(data_dir), backend="dali-cpu", batch_size=16, num_threads=2, initial_fill=64, seed=5)
    args.update(kw)
    return DataConfig(**args)


def _keys(meta):
    return list(zip(meta["product_id"].tolist(), meta["image_index"].tolist()))


def _fingerprint(batch):
    """What identifies a train batch: its labels and a checksum of its pixels (crops and flips)."""
    images, labels = batch
    return labels.tolist(), round(float(images.double().sum()), 2)


@pytest.fixture(scope="module")
def records(data_dir):
    """split -> [(product_id, image_index, label)] in file order."""
    ds = open_dataset(str(data_dir))
    return {s: [(r["product_id"], r["image_index"], r["label"]) for p in ds.shards(s)[0] for r in read_examples(p)]
            for s in ("train", "val")}


# ---- contract -----------------------------------------------------------------------------------------
def test_train_epoch_contract(data_dir, records):
    n = len(records["train"])
    loader, spe = build_loader(_cfg(data_dir), 0, 1, "train")
    assert spe == loader.steps_per_epoch == len(loader) == n // 16
    assert loader.num_samples == spe * 16
    ds = open_dataset(str(data_dir))
    assert loader.category_ids == ds.category_ids and loader.num_classes == 8
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == spe  # one `for` = one epoch
        for images, labels in batches:
            assert images.shape == (16, 160, 160, 3) and images.dtype == torch.uint8  # pixels, NHWC
            assert images.device.type == "cpu"
            assert labels.shape == (16,) and labels.dtype == torch.int64
            assert 0 <= int(labels.min()) and int(labels.max()) < 8
        # the generated pictures: a white background around a coloured block; pixels as decoded, not scaled
        assert int(batches[0][0].max()) == 255 and float(batches[0][0].float().std()) > 20
    assert loader.epoch == 2 and loader.step == 0


def test_eval_epoch_every_record_once_with_its_label(data_dir, records):
    """Eval: file order, all records once, last batch short, labels line up with product ids."""
    want = records["val"]
    loader, spe = build_loader(_cfg(data_dir), 0, 1, "val")
    assert loader.num_samples == len(want) and spe == -(-len(want) // 16)
    for _ in range(2):
        got = []
        sizes = []
        for images, labels, meta in loader:
            assert images.shape[1:] == (160, 160, 3)
            sizes.append(len(labels))
            got += [(p, i, lab) for (p, i), lab in zip(_keys(meta), labels.tolist())]
        assert got == want
        assert sizes[:-1] == [16] * (spe - 1) and sizes[-1] == len(want) - 16 * (spe - 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_eval_union_is_the_split_exactly_once(data_dir, records, world_size):
    want = [(p, i) for p, i, _ in records["val"]]
    seen = collections.Counter()
    for rank in range(world_size):
        loader, spe = build_loader(_cfg(data_dir), rank, world_size, "val")
        mine = [k for _, _, meta in loader for k in _keys(meta)]
        shard = shard_range(len(want), rank, world_size)
        assert mine == want[shard.start:shard.stop]  # a contiguous slice, in file order
        assert len(mine) == loader.num_samples
        seen.update(mine)
    assert sorted(seen) == sorted(want) and max(seen.values()) == 1


def _prints(images: torch.Tensor) -> list:
    """Fingerprints of whole images that are the same whichever way an image was flipped: the pixel
    sums of its rows, per channel (uint8 NHWC in)."""
    return [r.numpy().tobytes() for r in images.to(torch.int64).sum(2)]


@pytest.fixture(scope="module")
def whole_train_images(data_dir):
    """Fingerprint -> (product_id, image_index, label) for every train record.

    Tests below train with crop == image_size, where a random crop is the whole image: each train sample
    can then be traced back to its record, whichever way it was flipped."""
    ds = open_dataset(str(data_dir))
    paths, idxs, counts = ds.shards("train")
    pipe = build_pipeline(DataConfig(batch_size=64, num_threads=2, seed=1, crop=180, image_size=180),
                          paths=paths, index_paths=idxs, train=False)
    out = {}
    while len(out) < sum(counts):
        images, labels, pids, index = (torch.from_numpy(np.asarray(x.as_tensor())) for x in pipe.run())
        for i, fp in enumerate(_prints(images)):
            out[fp] = (int(pids[i]), int(index[i]), int(labels[i]))
    assert len(out) == sum(counts)  # all images distinct
    return out


def _divisor_batch(n: int, world_size: int) -> int:
    """A batch size that divides every rank's share N // W where W does not divide N: DALI pads the larger
    shards to one more batch, all of padding copies on the smaller ones."""
    assert n % world_size, f"{n} train records: pick a world size that does not divide them"
    return max(b for b in range(4, 33) if (n // world_size) % b == 0)


@pytest.mark.parametrize("world_size,bs,shuffle", [(2, 32, "epoch"), (3, 32, "epoch"), (3, "divides the share", "epoch"),
                                                   (2, 32, "buffer")])
def test_sharding_train_no_repeats_same_steps_labels_line_up(data_dir, records, whole_train_images, world_size, bs,
                                                            shuffle):
    """Train: every rank runs the same number of full batches; within an epoch no sample is seen twice
    (over all ranks), at most batch_size per rank are left out, and every label is its image's label.
    Three epochs, each started fresh (also where the batch size divides the share, so that DALI's padded
    shards end with a batch of padding). data.shuffle=epoch: each epoch a rank reads another random part of
    the split; buffer: in each next epoch every rank has moved on to the next shard."""
    n = len(records["train"])
    bs = bs if isinstance(bs, int) else _divisor_batch(n, world_size)
    cfg = _cfg(data_dir, crop=180, batch_size=bs, shuffle=shuffle)
    loaders = [build_loader(cfg, rank, world_size, "train")[0] for rank in range(world_size)]
    sets = []  # [epoch][rank] -> samples
    for epoch in range(3):
        seen = collections.Counter()
        sets.append([])
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == (n // world_size) // bs == loader.steps_per_epoch
            sets[-1].append(set())
            for images, labels in batches:
                assert images.shape == (bs, 180, 180, 3)
                for fp, lab in zip(_prints(images), labels.tolist()):
                    pid, index, want = whole_train_images[fp]
                    assert lab == want, (pid, index)
                    seen[(pid, index)] += 1
                    sets[-1][-1].add((pid, index))
        assert max(seen.values()) == 1
        assert n - world_size * bs <= len(seen) <= n
    for epoch in (1, 2):
        for rank in range(world_size):
            if shuffle == "buffer":  # rank r reads what rank r+1 read the epoch before
                nxt = sets[epoch - 1][(rank + 1) % world_size]
                assert len(sets[epoch][rank] & nxt) >= len(nxt) - 2 * bs, (epoch, rank)
            else:  # a random part: about 1/W of it read by this rank the epoch before
                before = sets[epoch - 1][rank]
                assert len(sets[epoch][rank] & before) < 0.5 * (1 + 1 / world_size) * len(before), (epoch, rank)


def test_unlabelled_test_data_for_eval(test_data_dir):
    ds = open_dataset(str(test_data_dir))
    n = ds.num_records("test")
    loader, spe = build_loader(_cfg(test_data_dir), 0, 1, "test", class_map=[1, 2, 3])
    assert loader.category_ids == [1, 2, 3] and loader.num_classes == 3  # no classes.csv: the run's map
    pids, labels = [], []
    for images, lab, meta in loader:
        pids += meta["product_id"].tolist()
        labels += lab.tolist()
    assert len(pids) == n and set(labels) == {-1}
    with open(os.path.join(str(test_data_dir), "products.csv")) as f:
        order = [int(line.split(",")[0]) for line in f.readlines()[1:]]
    assert list(dict.fromkeys(pids)) == order  # products in file order, images together


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_tiled_loader(data_dir, k):
    ds = open_dataset(str(data_dir))
    want = [r["product_id"] for p in ds.shards("val", k)[0] for r in read_examples(p)]
    loader, spe = build_loader(_cfg(data_dir, tiled_k=k, batch_size=4), 0, 1, "val")
    got = []
    for images, labels, meta in loader:
        assert images.shape[1:] == ((320, 320, 3) if k == 4 else (160, 160 * k, 3))
        assert set(meta["image_index"].tolist()) == {-1}
        got += meta["product_id"].tolist()
    assert got == want
    train, spe = build_loader(_cfg(data_dir, tiled_k=k, batch_size=4), 0, 1, "train")
    images, labels = next(iter(train))
    assert images.shape[1:] == ((320, 320, 3) if k == 4 else (160, 160 * k, 3)) and labels.shape == (4,)


def test_flip_and_whole_image(data_dir):
    plain = next(iter(build_loader(_cfg(data_dir), 0, 1, "val")[0]))[0]
    assert plain.shape == (16, 160, 160, 3) and plain.dtype == torch.uint8 and plain.is_contiguous()
    flipped = next(iter(build_loader(_cfg(data_dir), 0, 1, "val", flip=True)[0]))[0]
    assert torch.equal(flipped, plain.flip(2))  # TTA: the same images, mirrored (W is dim 2 in NHWC)
    full = next(iter(build_loader(_cfg(data_dir, eval_crop=False), 0, 1, "val")[0]))[0]
    assert full.shape == (16, 180, 180, 3) and torch.equal(full[:, 10:170, 10:170], plain)


def test_eval_batch_larger_than_a_rank_share(data_dir, records):
    """Eval accepts a batch bigger than a rank's share (one short batch); train refuses it."""
    n = len(records["val"])
    loader, spe = build_loader(_cfg(data_dir, batch_size=n), 1, 2, "val")
    sizes = [len(lab) for _, lab, _ in loader]
    assert spe == 1 and sizes == [len(shard_range(n, 1, 2))]


# ---- resume ---------------------------------------------------------------------------------------------
def _roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as the trainer's checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_mid_epoch_and_at_epoch_end(data_dir):
    cfg = _cfg(data_dir)
    ref_loader, spe = build_loader(cfg, 1, 2, "train")
    ref = [[_fingerprint(b) for b in ref_loader] for _ in range(2)]

    a, _ = build_loader(cfg, 1, 2, "train")
    got = []
    for i, b in enumerate(a):
        got.append(_fingerprint(b))
        if i == spe // 2:
            break
    state = _roundtrip(a.state())
    assert state["epoch"] == 0 and state["step"] == spe // 2 + 1
    del a
    # Threads and prefetch depth are not part of the position: they may change between runs.
    b, _ = build_loader(_cfg(data_dir, num_threads=1, prefetch=3), 1, 2, "train", state=state)
    got += [_fingerprint(x) for x in b]
    assert got == ref[0]  # same samples, crops and flips as the uninterrupted epoch
    assert [_fingerprint(x) for x in b] == ref[1]

    # The trainer saves right after the last batch, before the loop sees the end of the epoch.
    c, _ = build_loader(cfg, 1, 2, "train")
    for i, _x in enumerate(c):
        if i == spe - 1:
            break
    state = _roundtrip(c.state())
    assert (state["epoch"], state["step"]) == (1, 0)
    d, _ = build_loader(cfg, 1, 2, "train", state=state)
    assert [_fingerprint(x) for x in d] == ref[1]


def test_resume_eval_mid_epoch(data_dir, records):
    a, _ = build_loader(_cfg(data_dir), 0, 1, "val")
    it = iter(a)
    first = [k for k in _keys(next(it)[2])]
    b, _ = build_loader(_cfg(data_dir), 0, 1, "val", state=_roundtrip(a.state()))
    rest = [k for _, _, meta in b for k in _keys(meta)]
    assert first + rest == [(p, i) for p, i, _ in records["val"]]


def test_state_from_another_configuration_is_refused(data_dir):
    cfg = _cfg(data_dir)
    loader, _ = build_loader(cfg, 1, 2, "train")
    next(iter(loader))
    state = loader.state()
    with pytest.raises(ValueError, match=r"data.batch_size: saved 16, now 8"):
        build_loader(_cfg(data_dir, batch_size=8), 1, 2, "train", state=state)
    with pytest.raises(ValueError, match=r"data.seed"):
        build_loader(_cfg(data_dir, seed=6), 1, 2, "train", state=state)
    with pytest.raises(ValueError, match=r"rank: saved 1, now 0"):
        build_loader(cfg, 0, 2, "train", state=state)
    with pytest.raises(ValueError, match=r"world_size: saved 2, now 3"):
        build_loader(cfg, 1, 3, "train", state=state)
    with pytest.raises(ValueError, match=r"split: saved 'train', now 'val'"):
        build_loader(cfg, 1, 2, "val", state=state)
    with pytest.raises(ValueError, match="not a state"):
        build_loader(cfg, 1, 2, "train", state={"epoch": 0})
    with pytest.raises(ValueError, match="version 1, from another version of the code"):
        build_loader(cfg, 1, 2, "train", state=dict(state, version=1))  # its next epoch could start with padding
    with pytest.raises(ValueError, match="backend: saved 'dali-cpu', now 'synthetic'"):
        build_loader(_cfg(data_dir, backend="synthetic"), 1, 2, "train", state=state)
    # A DALI checkpoint of another graph (here: tiled products) under a matching label is still refused.
    tiled, _ = build_loader(_cfg(data_dir, tiled_k=2, batch_size=4), 1, 2, "train")
    with pytest.raises(ValueError, match="does not fit this pipeline"):
        build_loader(cfg, 1, 2, "train", state=dict(state, dali=tiled.state()["dali"]))


def test_state_with_another_flip_or_another_record_count_is_refused(data_dir, synthetic_dir, records, tmp_path):
    import bson

    from dali_pipes.writer.bson_io import iter_products
    from tools import repack

    cfg = _cfg(data_dir)
    plain, _ = build_loader(cfg, 0, 1, "val")
    next(iter(plain))
    state = plain.state()
    # the mirrored TTA pass cannot take over the plain pass's reader position, nor the other way round
    with pytest.raises(ValueError, match=r"flip: saved False, now True"):
        build_loader(cfg, 0, 1, "val", state=state, flip=True)
    flipped, _ = build_loader(cfg, 0, 1, "val", flip=True)
    next(iter(flipped))
    with pytest.raises(ValueError, match=r"flip: saved True, now False"):
        build_loader(cfg, 0, 1, "val", state=flipped.state())
    # the same settings on a data set with other records (here: a repack of fewer products)
    docs = list(iter_products(str(synthetic_dir / "train.bson")))[:300]
    with open(tmp_path / "fewer.bson", "wb") as f:
        for d in docs:
            f.write(bson.encode(d))
    assert repack.main(["--bson", str(tmp_path / "fewer.bson"), "--categories", str(synthetic_dir / "category_names.csv"),
                        "--out", str(tmp_path / "FEWER"), "--val-fraction", "0.2", "--workers", "1", "--quiet"]) == 0
    n_val = len(records["val"])
    n_fewer = sum(1 for p in open_dataset(str(tmp_path / "FEWER")).shards("val")[0] for _ in read_examples(p))
    assert 0 < n_fewer < n_val
    with pytest.raises(ValueError, match=rf"num_records: saved {n_val}, now {n_fewer}"):
        build_loader(_cfg(tmp_path / "FEWER"), 0, 1, "val", state=state)


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.fixture
def data_copy(data_dir, tmp_path):
    dst = tmp_path / "DATA"
    shutil.copytree(data_dir, dst)
    return dst


def test_error_no_manifest(data_copy):
    os.remove(data_copy / "manifest.json")
    with pytest.raises(DatasetError, match="manifest.json"):
        build_loader(_cfg(data_copy), 0, 1, "train")


def test_error_missing_and_stale_index(data_copy):
    idx = sorted((data_copy / "train").glob("*.idx"))[0]
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="stale index"):
        build_loader(_cfg(data_copy), 0, 1, "train")
    idx.unlink()
    with pytest.raises(DatasetError, match="index file missing"):
        build_loader(_cfg(data_copy), 0, 1, "train")


def test_error_class_map_differs(data_dir):
    ds = open_dataset(str(data_dir))
    build_loader(_cfg(data_dir), 0, 1, "val", class_map=ds.category_ids)  # the same map is fine
    with pytest.raises(DatasetError, match="class map differs"):
        build_loader(_cfg(data_dir), 0, 1, "val", class_map=ds.category_ids[:-1])
    with pytest.raises(DatasetError, match="class map differs"):
        build_loader(_cfg(data_dir), 0, 1, "train", class_map=ds.category_ids[::-1])


def test_error_batch_larger_than_shard_share(data_dir, records):
    n = len(records["train"])
    with pytest.raises(ValueError, match=r"fewer than data.batch_size=.*lower data.batch_size"):
        build_loader(_cfg(data_dir, batch_size=n // 2 + 1), 0, 2, "train")
    with pytest.raises(DatasetError, match="fewer than the .* process"):
        build_loader(_cfg(data_dir), 0, len(records["val"]) + 1, "val")


def test_error_gpu_backend_without_cuda(data_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="use data.backend=dali-cpu"):
        build_loader(_cfg(data_dir, backend="dali-gpu"), 0, 1, "train")


def test_error_bad_rank_and_split(data_dir):
    with pytest.raises(ValueError, match="rank 2"):
        build_loader(_cfg(data_dir), 2, 2, "train")
    with pytest.raises(DatasetError, match="no split 'nope'"):
        build_loader(_cfg(data_dir), 0, 1, "nope")


# ---- synthetic --------------------------------------------------------------------------------------------
def test_synthetic_backend():
    cfg = DataConfig(backend="synthetic", batch_size=4, crop=32, image_size=40, synthetic_num_classes=10,
                     synthetic_steps=3)
    loader, spe = build_loader(cfg, 0, 1, "train", device=torch.device("cpu"))
    assert spe == 3 and loader.num_classes == 10 and loader.num_samples == 12
    batches = list(loader)
    assert len(batches) == 3 and len(list(loader)) == 3
    images, labels = batches[0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert int(labels.max()) < 10 and batches[1][0] is images  # made once, reused
    state = loader.state()
    assert build_loader(cfg, 0, 1, "train", state=state)[0].epoch == 2
    images, labels, meta = next(iter(build_loader(cfg, 0, 1, "val")[0]))
    assert meta["product_id"].shape == (4,) and images.shape == (4, 32, 32, 3)
    cfg.eval_crop = False
    assert next(iter(build_loader(cfg, 0, 1, "val")[0]))[0].shape == (4, 40, 40, 3)  # the crop rule as DALI's


# ---- memory -----------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_rss_does_not_grow_over_epochs(data_dir):
    loader, spe = build_loader(_cfg(data_dir, batch_size=32), 0, 1, "train")
    for _ in range(2):  # warm up: pools and buffers reach their size
        for _b in loader:
            pass
    gc.collect()
    before = _rss_mb()
    for _ in range(6):
        for images, labels in loader:
            float(images[0, 0, 0, 0])
    gc.collect()
    after = _rss_mb()
    assert after < before * 1.03 + 8, f"RSS {before:.0f} MB -> {after:.0f} MB over 6 epochs"


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("k", [0, 4])
def test_dali_gpu_eval_matches_dali_cpu(data_dir, k):
    """The GPU graph yields the same records in the same order as the CPU one, on the GPU, with pixels
    equal within JPEG decoder differences (nvJPEG / hardware decoder vs libjpeg-turbo)."""
    dev = torch.device("cuda", 0)
    cpu, _ = build_loader(_cfg(data_dir, tiled_k=k, batch_size=8), 0, 1, "val")
    gpu, _ = build_loader(_cfg(data_dir, tiled_k=k, batch_size=8, backend="dali-gpu"), 0, 1, "val", device=dev)
    diffs = []
    for (xc, yc, mc), (xg, yg, mg) in zip(cpu, gpu):
        assert xg.device == dev and yg.device == dev and yg.dtype == torch.int64
        assert xg.dtype == torch.uint8 and xg.shape == xc.shape
        assert torch.equal(yg.cpu(), yc) and torch.equal(mg["product_id"], mc["product_id"])
        assert torch.equal(mg["image_index"], mc["image_index"])
        diffs.append((xg.cpu().float() - xc.float()).abs().flatten())
    d = torch.cat(diffs)
    p99 = float(np.percentile(d.numpy(), 99))
    print(f"dali-gpu vs dali-cpu, K={k}: mean {float(d.mean()):.3f}, p99 {p99:.0f}, max {float(d.max()):.0f} levels")
    # nvJPEG and libjpeg-turbo upsample chroma differently next to sharp colour edges: a few pixels differ by
    # up to ~100 levels. libjpeg-turbo's own two upsamplings differ on such pictures by mean 0.95, p99 14.
    assert float(d.mean()) < 1.5 and p99 < 24


@pytest.mark.gpu
def test_dali_gpu_train_layouts_and_resume(data_dir):
    dev = torch.device("cuda", 0)
    cfg = _cfg(data_dir, backend="dali-gpu")
    loader, spe = build_loader(cfg, 0, 1, "train", device=dev)
    ref = []
    for images, labels in loader:
        assert images.shape == (16, 160, 160, 3) and images.dtype == torch.uint8 and images.device == dev
        assert labels.shape == (16,) and labels.dtype == torch.int64 and labels.device == dev
        ref.append(_fingerprint((images.float().cpu(), labels.cpu())))
    assert len(ref) == spe
    a, _ = build_loader(cfg, 0, 1, "train", device=dev)
    it = iter(a)
    got = [_fingerprint((x.float().cpu(), y.cpu())) for x, y in (next(it) for _ in range(3))]
    b, _ = build_loader(cfg, 0, 1, "train", device=dev, state=_roundtrip(a.state()))
    got += [_fingerprint((x.float().cpu(), y.cpu())) for x, y in b]
    assert got == ref  # resumed mid-epoch on the GPU: the same samples, crops and flips


# ---- the per-picture resize check: only in the graph where a picture may need it ----------------------------
def _graph_has_resize(loader) -> bool:
    """Read from the DALI graph itself: a Resize operator and the conditional's split (an if on the shape)."""
    ser = loader.pipe.serialize()
    resize, split = b"Resize" in ser, b"__Split_" in ser
    assert resize == split  # the resize is there exactly when its conditional is
    return resize


def test_all_square_data_builds_no_resize_check(data_dir):
    """The synthetic pictures are all 180x180 and the manifest says so: no check, no conditional, for the image
    and the product splits; a loader that resizes to another image_size (the demo recipe's 96) keeps it."""
    from dali_pipes.pipelines import has_resize_check

    m = open_dataset(str(data_dir)).manifest
    assert [m["splits"][s]["picture_sizes"] for s in ("train", "val")] == [
        {"180x180": m["splits"][s]["images"]} for s in ("train", "val")]
    for split, kw in (("train", {}), ("val", {}), ("train", {"tiled_k": 2})):
        loader, _ = build_loader(_cfg(data_dir, **kw), 0, 1, split)
        assert not loader.resize_check and not _graph_has_resize(loader) and not has_resize_check(loader.pipe)
        assert next(iter(loader))[0].shape[1:3] == (160, 160 * (kw.get("tiled_k") or 1))
    loader, _ = build_loader(_cfg(data_dir, image_size=96, crop=80), 0, 1, "train")
    assert loader.resize_check and _graph_has_resize(loader) and has_resize_check(loader.pipe)
    assert next(iter(loader))[0].shape[1:3] == (80, 80)


def _drop_picture_sizes(data_dir) -> None:
    import json

    mpath = data_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    for split in m["splits"].values():
        split.pop("picture_sizes", None)
    mpath.write_text(json.dumps(m))


def test_window_decode_graph_yields_the_same_batches(data_dir, data_copy):
    """On all-square data the CPU loader decodes each window straight into the batch, mirrored where drawn
    (the window decoder); with the size check kept (a manifest without picture_sizes) it decodes whole
    pictures with DALI's decoder and crops and mirrors in DALI. Same seed, same draws: the same train batches,
    pixel for pixel, single pictures and tiled products, and the same mirrored eval (TTA) batches (strip and
    2x2 grid: every tile mirrored in its own place)."""
    _drop_picture_sizes(data_copy)
    for k in (0, 2, 4):
        window, _ = build_loader(_cfg(data_dir, batch_size=8, tiled_k=k), 0, 1, "train")
        check, _ = build_loader(_cfg(data_copy, batch_size=8, tiled_k=k), 0, 1, "train")
        assert (window.graph, check.graph) == ("window-decode", "size-check")
        flipped = 0
        for (a, la), (b, lb) in zip(window, check):
            assert torch.equal(la, lb) and torch.equal(a, b), k
            flipped += int(sum(not torch.equal(x, x.flip(1)) for x in a))
        assert flipped  # pictures that a mirror changes
        a = next(iter(build_loader(_cfg(data_dir, tiled_k=k), 0, 1, "val", flip=True)[0]))[0]
        b = next(iter(build_loader(_cfg(data_copy, tiled_k=k), 0, 1, "val", flip=True)[0]))[0]
        assert torch.equal(a, b), k


def test_mid_epoch_state_of_the_earlier_consumer_crop_graph_is_refused_by_name(data_dir):
    """The README's migration promise: a dali-cpu state saved mid-epoch by the version whose CPU graph left
    the columns and the mirror to the consumer ('consumer-crop') is refused, naming both graphs, before any
    reader is built; the same state with today's graph name resumes."""
    from dali_pipes.loader import LoaderStateError

    a, _ = build_loader(_cfg(data_dir), 0, 1, "train")
    it = iter(a)
    next(it), next(it)
    state = a.state()
    assert state["graph"] == "window-decode" and state["step"] == 2
    old = dict(state, graph="consumer-crop")
    with pytest.raises(LoaderStateError) as e:
        build_loader(_cfg(data_dir), 0, 1, "train", state=old)
    assert e.value.detail == "graph: saved 'consumer-crop', now 'window-decode'"
    b, _ = build_loader(_cfg(data_dir), 0, 1, "train", state=state)
    assert torch.equal(next(iter(b))[0], next(it)[0])


def test_manifest_without_picture_sizes_keeps_the_resize_check(data_copy):
    """A DATA directory from before the field (or with sizes that do not add up) keeps the check."""
    import json

    mpath = data_copy / "manifest.json"
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["picture_sizes"] = {"180x180": m["splits"]["train"]["images"] - 1}
    del m["splits"]["val"]["picture_sizes"]
    mpath.write_text(json.dumps(m))
    for split in ("train", "val"):
        loader, _ = build_loader(_cfg(data_copy), 0, 1, split)
        assert loader.resize_check and _graph_has_resize(loader)
        assert next(iter(loader))[0].shape[1:3] == (160, 160)


@pytest.mark.gpu
@pytest.mark.parametrize("tiled_k", [0, 4])
def test_dali_cpu_to_gpu_same_batches_as_on_the_cpu(data_dir, tiled_k):
    """dali-cpu with a CUDA device: batches go through page-locked memory on a copy stream; the same train and
    mirrored eval batches, pixel for pixel, as the loader without
    a device, also when they are kept while later ones arrive and a "step" keeps the compute stream busy."""
    dev = torch.device("cuda", 0)
    for split, flip in (("train", False), ("val", True)):
        cfg = _cfg(data_dir, tiled_k=tiled_k, batch_size=8)
        host, _ = build_loader(cfg, 0, 1, split, flip=flip)
        gpu, _ = build_loader(cfg, 0, 1, split, flip=flip, device=dev)
        assert gpu.graph == "window-decode"
        kept = []
        for n, (a, b) in enumerate(zip(host, gpu)):
            assert b[0].device == dev and b[1].device == dev
            kept.append((a[0].clone(), a[1].clone(), b[0], b[1]))
            busy = torch.randn(2048, 2048, device=dev)
            busy = busy @ busy @ busy  # queued on the compute stream, as a training step would be
            if n == 5:
                break
        for n, (host_images, host_labels, images, labels) in enumerate(kept):
            assert torch.equal(host_images, images.cpu()) and torch.equal(host_labels, labels.cpu()), (split, n)
