"""Order must not matter: a train.bson sorted by category trains on batches as mixed as a shuffled one, and
each epoch visits the images in a new order (repack: dali_pipes/writer/shuffle.py; loader: dali_pipes/order.py).

The sets are ~20x the shuffle buffer (data.initial_fill=32, batches of 32): a buffer that holds most of the
set would mix any file."""
import collections
import os
import tempfile

import pytest

from dali_pipes import order
from dali_pipes.config import DataConfig
from dali_pipes.dataset import open_dataset
from dali_pipes.loader import build_loader
from dali_pipes.records import read_examples
from tools import repack
from tools.bench import rank_correlation

BUFFER = 32


def _repack(raw, out, *extra):
    assert repack.main(["--bson", str(raw / "train.bson"), "--categories", str(raw / "category_names.csv"),
                        "--out", str(out), "--val-fraction", "0.05", "--shard-size-mb", "0.5", "--workers", "1",
                        "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def sorted_data(sorted_synthetic_dir, tmp_path_factory):
    """The sorted file repacked as the repack does by default (shuffled) and in the file's order."""
    base = tmp_path_factory.mktemp("order")
    return {"raw": sorted_synthetic_dir, "shuffle": _repack(sorted_synthetic_dir, base / "shuffled"),
            "file": _repack(sorted_synthetic_dir, base / "file", "--order", "file")}


def _records(data, group="train"):
    """[(shard, product_id, image_index or -1, label)] of a split or product group, in file order."""
    m = open_dataset(str(data)).manifest
    infos = m["splits"][group]["shards"] if group in m["splits"] else m["products_k"][group[0]]["train"]["shards"]
    return [(i, e["product_id"], e.get("image_index", -1), e["label"]) for i, info in enumerate(infos)
            for e in read_examples(str(data / info["path"]))]


def _cfg(data, **kw):
    return DataConfig(path=str(data), backend="dali-cpu", batch_size=BUFFER, num_threads=1, initial_fill=BUFFER,
                      crop=32, seed=3, **kw)


def _classes_per_batch(data, **kw):
    loader, _ = build_loader(_cfg(data, **kw), 0, 1, "train")
    counts = [len(set(labels.tolist())) for _, labels in loader]
    return sum(counts) / len(counts)


def test_repack_scatters_a_sorted_file_over_every_train_shard(sorted_data, tmp_path):
    """Each train shard of the default repack holds nearly every class (in the file's order each holds a
    few); the same records, none lost or doubled; the products' K groups too; val keeps the file order; the
    seed is in the manifest and another seed gives another order."""
    shuffled, kept = _records(sorted_data["shuffle"]), _records(sorted_data["file"])
    assert sorted(r[1:] for r in shuffled) == sorted(r[1:] for r in kept)
    classes = len({r[3] for r in kept})
    for records in (shuffled, kept):
        assert len({r[0] for r in records}) > 3  # several shards
    per_shard = collections.defaultdict(set)
    for shard, _, _, label in shuffled:
        per_shard[shard].add(label)
    assert min(map(len, per_shard.values())) >= classes - 1
    runs = sum(a[3] != b[3] for a, b in zip(kept, kept[1:]))
    assert runs < classes and sum(a[3] != b[3] for a, b in zip(shuffled, shuffled[1:])) > 10 * classes
    k1 = [r[3] for r in _records(sorted_data["shuffle"], "1")]
    assert sum(a != b for a, b in zip(k1, k1[1:])) > 5 * classes
    assert _records(sorted_data["shuffle"], "val") == _records(sorted_data["file"], "val")
    m = open_dataset(str(sorted_data["shuffle"])).manifest["settings"]
    assert (m["order"], m["shuffle_seed"]) == ("shuffle", 0)
    other = _records(_repack(sorted_data["raw"], tmp_path / "seed1", "--shuffle-seed", "1"))
    assert [r[1:3] for r in other] != [r[1:3] for r in shuffled]
    assert sorted(r[1:] for r in other) == sorted(r[1:] for r in kept)


def test_sorted_file_trains_on_batches_as_mixed_as_a_shuffled_one(sorted_data, data_dir):
    """Distinct classes per batch read from the sorted file >= 0.95x those from the shuffled data_dir (the
    same products, generated shuffled); the sorted file read as before (file order, buffer only) is far less
    mixed, which is what this set's size can show."""
    shuffled = _classes_per_batch(data_dir, shuffle="buffer")
    assert _classes_per_batch(sorted_data["shuffle"]) >= 0.95 * shuffled
    assert _classes_per_batch(sorted_data["file"], shuffle="buffer") < 0.6 * shuffled


def _orders(data, rank, world_size, **kw):
    loader, _ = build_loader(_cfg(data, **kw), rank, world_size, "train")
    loader.keep_ids = True
    orders = []
    for _ in range(2):
        order = []
        for _batch in loader:
            order += zip(*(t.tolist() for t in loader.last_ids))
        orders.append(order)
    return orders


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_epoch_visits_the_images_in_a_new_order(sorted_data, world_size):
    """Per rank, the rank correlation of the images' positions in epochs 1 and 2 is near 0 (it is near 1 with
    data.shuffle=buffer, the reader's shuffle buffer alone)."""
    for rank in range(world_size):
        first, second = _orders(sorted_data["shuffle"], rank, world_size)
        assert len(set(first)) == len(first)
        assert abs(rank_correlation(first, second)) < 0.15, rank
    assert rank_correlation(*_orders(sorted_data["shuffle"], 0, 1, shuffle="buffer")) > 0.7


def test_resume_mid_epoch_in_a_later_epoch(sorted_data, tmp_path, monkeypatch):
    """A state taken in the middle of epoch 2 resumes that epoch's own order, the same batches as without a
    stop (the reader position is one in the epoch's index files, made again from the seed). The index files
    go to the memory file system where it has room, else to the temporary folder, and are gone once each
    reader is built (nothing left behind by a killed run)."""
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    monkeypatch.setattr(order, "SHM", str(shm))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(kw.get("dir")) or mkdtemp(**kw))
    cfg = _cfg(sorted_data["shuffle"])
    ref, spe = build_loader(cfg, 1, 2, "train")
    ref.keep_ids = True
    want = []
    for epoch in range(2):
        for _ in ref:
            want.append(ref.last_ids[0].tolist())
    a, _ = build_loader(cfg, 1, 2, "train")
    a.keep_ids = True
    got = []
    for _ in a:
        got.append(a.last_ids[0].tolist())
    for i, _ in enumerate(a):
        got.append(a.last_ids[0].tolist())
        if i == spe // 2:
            break
    state = a.state()
    assert (state["epoch"], state["step"]) == (1, spe // 2 + 1)
    del a
    b, _ = build_loader(cfg, 1, 2, "train", state=state)
    b.keep_ids = True
    for _ in b:
        got.append(b.last_ids[0].tolist())
    assert got == want
    assert made and set(made) == {str(shm)}
    assert list(shm.iterdir()) == [] and list(tmp.iterdir()) == []
    st = os.statvfs(shm)
    assert order.scratch_root(st.f_bavail * st.f_frsize // 24) is None  # no room for four ranks' files
    monkeypatch.setattr(order, "SHM", str(tmp_path / "none"))
    assert order.scratch_root(10) is None
