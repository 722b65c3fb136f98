"""The synthetic Cdiscount-format generator: schema, mix, images, determinism, learnability, CLI."""
import collections
import csv
import io
import os

import bson
import numpy as np
import pytest
from PIL import Image

from tools import synthetic
from tools import make_synthetic

N_TRAIN, N_TEST, N_CAT = 2000, 300, 20


def _docs(path):
    with open(path, "rb") as fh:
        return list(bson.decode_file_iter(fh))


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    r = synthetic.make_dataset(out, products=N_TRAIN, test_products=N_TEST, categories=N_CAT, seed=0)
    return r, _docs(r["train_bson"]), _docs(r["test_bson"])


def _small(path, seed=0, workers=1):
    return synthetic.make_dataset(str(path), products=120, test_products=30, categories=8, seed=seed, workers=workers)


def _file_bytes(r):
    return {k: open(r[k], "rb").read() for k in ("train_bson", "test_bson", "category_names", "test_answers")}


def test_files_and_counts(ds):
    r, train, test = ds
    assert sorted(os.listdir(os.path.dirname(r["train_bson"]))) == [
        "category_names.csv", "test.bson", "test_answers.csv", "train.bson"]  # no temp files left
    assert (r["train_products"], r["test_products"], r["categories"]) == (N_TRAIN, N_TEST, N_CAT)
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert r["train_images"] == sum(len(d["imgs"]) for d in train)
    assert r["test_images"] == sum(len(d["imgs"]) for d in test)


def test_train_schema_and_ids(ds):
    r, train, test = ds
    for d in train:
        assert list(d) == ["_id", "category_id", "imgs"]
        assert type(d["_id"]) is int and type(d["category_id"]) is int
        assert 1000000000 <= d["category_id"] <= 9999999999
        assert 1 <= len(d["imgs"]) <= 4
        for img in d["imgs"]:
            assert list(img) == ["picture"] and isinstance(img["picture"], bytes)
    ids = np.array([d["_id"] for d in train])
    gaps = np.diff(ids)
    assert ids[0] >= 0 and (gaps > 0).all()  # increasing, distinct
    assert (gaps > 1).any() and np.mean(gaps == 1) > 0.3  # mostly +1, not contiguous
    for d in test:
        assert list(d) == ["_id", "imgs"] and type(d["_id"]) is int and 1 <= len(d["imgs"]) <= 4
    test_ids = [d["_id"] for d in test]
    assert test_ids == sorted(set(test_ids))
    assert not set(test_ids) & set(ids.tolist())


def test_category_names(ds):
    r, train, _ = ds
    rows = _read_csv(r["category_names"])
    assert rows[0] == ["category_id", "category_level1", "category_level2", "category_level3"]
    body = rows[1:]
    assert len(body) == N_CAT and all(len(row) == 4 and all(row) for row in body)
    cids = [int(row[0]) for row in body]
    assert len(set(cids)) == N_CAT and all(len(row[0]) == 10 for row in body)
    assert len({row[3] for row in body}) == N_CAT  # level3 unique
    assert 2 <= len({row[1] for row in body}) < N_CAT  # a tree: few level1 names
    assert {d["category_id"] for d in train} == set(cids)  # every category is used, all are listed
    # names with commas survive the round trip (quoted by the csv module)
    big = synthetic.category_table(200)
    assert any("," in row[3] for row in big)


def test_test_answers(ds):
    r, _, test = ds
    rows = _read_csv(r["test_answers"])
    assert rows[0] == ["_id", "category_id"]
    answers = {int(a): int(b) for a, b in rows[1:]}
    assert len(answers) == len(rows) - 1 == N_TEST
    assert set(answers) == {d["_id"] for d in test}
    cids = {int(row[0]) for row in _read_csv(r["category_names"])[1:]}
    assert set(answers.values()) <= cids


def test_image_count_mix_and_category_sizes(ds):
    _, train, _ = ds
    n = collections.Counter(len(d["imgs"]) for d in train)
    for k, p in zip((1, 2, 3, 4), synthetic.IMAGE_COUNT_P):
        assert abs(n[k] / N_TRAIN - p) < 0.04, (k, n)
    sizes = sorted(collections.Counter(d["category_id"] for d in train).values())
    assert len(sizes) == N_CAT and sizes[0] >= 3  # every category has a few products
    assert sizes[-1] >= 4 * sizes[0]  # uneven: some big, many small


def test_jpegs(ds):
    _, train, test = ds
    pics = [img["picture"] for d in train + test for img in d["imgs"]]
    sizes = np.array([len(p) for p in pics])
    assert 4000 <= sizes.mean() <= 6000, sizes.mean()
    assert sizes.min() > 1000 and sizes.max() < 20000
    for p in pics[::7]:
        assert p[:2] == b"\xff\xd8" and p[-2:] == b"\xff\xd9"
        im = Image.open(io.BytesIO(p))
        assert im.format == "JPEG" and im.size == (180, 180) and im.mode == "RGB"
        im.load()
    # white background: corners are near white in most images
    corner = [np.asarray(Image.open(io.BytesIO(p)))[:6, :6].mean() for p in pics[:200]]
    assert np.mean(np.array(corner) > 230) > 0.9


def test_learnable(ds):
    """Nearest class mean on 8x8 thumbnails of the first image, held-out test products."""
    r, train, test = ds
    answers = {int(a): int(b) for a, b in _read_csv(r["test_answers"])[1:]}

    def thumbs(docs):
        out = []
        for d in docs:
            im = Image.open(io.BytesIO(d["imgs"][0]["picture"]))
            im.draft("RGB", (45, 45))
            out.append(np.asarray(im.resize((8, 8), Image.BILINEAR), np.float32).ravel())
        return np.stack(out)

    x, y = thumbs(train), np.array([d["category_id"] for d in train])
    xt, yt = thumbs(test), np.array([answers[d["_id"]] for d in test])
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    pred = classes[((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    acc = (pred == yt).mean()
    majority = max(np.mean(yt == c) for c in classes)
    assert acc > 0.6 and acc > 2 * majority, (acc, majority)


def test_deterministic(tmp_path):
    a = _file_bytes(_small(tmp_path / "a", seed=0))
    b = _file_bytes(_small(tmp_path / "b", seed=0))
    assert a == b
    c = _file_bytes(_small(tmp_path / "c", seed=1))
    assert c["train_bson"] != a["train_bson"] and c["test_bson"] != a["test_bson"]
    assert c["test_answers"] != a["test_answers"]
    assert c["category_names"] == a["category_names"]  # the taxonomy does not depend on the seed


def test_workers_do_not_change_output(tmp_path):
    a = _file_bytes(_small(tmp_path / "a", seed=3, workers=1))
    b = _file_bytes(_small(tmp_path / "b", seed=3, workers=2))
    assert a == b


def test_taxonomy_prefix_stable():
    t5, t40 = synthetic.category_table(5), synthetic.category_table(40)
    assert t40[:5] == t5
    ids = [row[0] for row in t40]
    assert ids == sorted(set(ids)) and all(1000000000 <= i < 10000000000 for i in ids)
    s10, s30 = synthetic.category_styles(10), synthetic.category_styles(30)
    assert (s30[:10] == s10).all()
    assert len({tuple(s) for s in s30.tolist()}) == 30
    assert len({(s[0], s[1]) for s in s10.tolist()}) == 10  # first ones differ in shape or colour


def test_make_jpeg():
    a = synthetic.make_jpeg(3, seed=1)
    assert a == synthetic.make_jpeg(3, seed=1) and a != synthetic.make_jpeg(3, seed=2)
    im = Image.open(io.BytesIO(a))
    assert im.size == (180, 180) and im.mode == "RGB"
    assert Image.open(io.BytesIO(synthetic.make_jpeg(0, mode="L"))).mode == "L"
    assert Image.open(io.BytesIO(synthetic.make_jpeg(0, mode="CMYK"))).mode == "CMYK"
    assert Image.open(io.BytesIO(synthetic.make_jpeg(0, size=(200, 150)))).size == (200, 150)
    assert Image.open(io.BytesIO(synthetic.make_jpeg(0, size=64))).size == (64, 64)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(a[: len(a) // 2])).load()


def test_write_bson_atomic(tmp_path):
    path = str(tmp_path / "x.bson")
    docs = [{"_id": 1, "imgs": [{"picture": b"abc"}]}, {"_id": 2, "imgs": []}]
    assert synthetic.write_bson(path, docs)[0] == 2
    before = open(path, "rb").read()
    assert [d["_id"] for d in _docs(path)] == [1, 2]

    def broken():
        yield {"_id": 3, "imgs": []}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        synthetic.write_bson(path, broken())
    assert open(path, "rb").read() == before  # the old file is untouched
    assert os.listdir(tmp_path) == ["x.bson"]  # and no temp file is left


def test_empty_and_bad_args(tmp_path):
    r = synthetic.make_dataset(str(tmp_path), products=0, test_products=0, categories=3, seed=0)
    assert os.path.getsize(r["train_bson"]) == 0 and os.path.getsize(r["test_bson"]) == 0
    assert len(_read_csv(r["category_names"])) == 4
    with pytest.raises(ValueError):
        synthetic.make_dataset(str(tmp_path), products=10, test_products=0, categories=0)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = make_synthetic.main(["--out", str(out), "--products", "40", "--test-products", "10",
                              "--categories", "4", "--seed", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train.bson" in text and "images" in text and "MB" in text
    assert len(_docs(out / "train.bson")) == 40 and len(_docs(out / "test.bson")) == 10
    with pytest.raises(SystemExit):
        make_synthetic.main(["--out", str(out), "--categories", "0"])


def test_label_noise_side_file_matches_the_bson(tmp_path):
    """--label-noise 0.1: exactly round(0.1 * N) products get another category_id; the images stay those of
    the clean set (same seed), and train_label_noise.csv lists exactly the changed products."""
    clean = _small(tmp_path / "clean", seed=3)
    assert make_synthetic.main(["--out", str(tmp_path / "noisy"), "--products", "120", "--test-products", "30",
                                "--categories", "8", "--seed", "3", "--label-noise", "0.1"]) == 0
    noisy_dir = tmp_path / "noisy"
    a, b = _docs(clean["train_bson"]), _docs(noisy_dir / "train.bson")
    assert [d["_id"] for d in a] == [d["_id"] for d in b]
    assert all(x["imgs"] == y["imgs"] for x, y in zip(a, b))  # pictures show the true category
    changed = {y["_id"]: (y["category_id"], x["category_id"]) for x, y in zip(a, b)
               if x["category_id"] != y["category_id"]}
    assert len(changed) == 12  # round(0.1 * 120)
    rows = _read_csv(noisy_dir / "train_label_noise.csv")
    assert rows[0] == ["_id", "category_id", "true_category_id"]
    assert {int(r[0]): (int(r[1]), int(r[2])) for r in rows[1:]} == changed
    assert open(noisy_dir / "test.bson", "rb").read() == open(clean["test_bson"], "rb").read()
    assert not os.path.exists(os.path.dirname(clean["train_bson"]) + "/train_label_noise.csv")


def test_duplicates_copy_train_images_into_that_share_of_test_products(tmp_path):
    """--duplicates 0.3: exactly round(0.3 * 30) test products carry, byte for byte, the images of the train
    product listed for them in test_duplicates.csv, and its category is their answer; train.bson and the
    other test products are those of the set without duplicates (same seed)."""
    clean = _small(tmp_path / "clean", seed=4)
    assert make_synthetic.main(["--out", str(tmp_path / "dup"), "--products", "120", "--test-products", "30",
                                "--categories", "8", "--seed", "4", "--duplicates", "0.3"]) == 0
    d = tmp_path / "dup"
    assert open(d / "train.bson", "rb").read() == open(clean["train_bson"], "rb").read()
    train = {x["_id"]: x for x in _docs(d / "train.bson")}
    test, test0 = _docs(d / "test.bson"), _docs(clean["test_bson"])
    rows = _read_csv(d / "test_duplicates.csv")
    assert rows[0] == ["_id", "train_id"]
    listed = {int(r[0]): int(r[1]) for r in rows[1:]}
    assert len(listed) == 9  # round(0.3 * 30)
    answers = {int(r[0]): int(r[1]) for r in _read_csv(d / "test_answers.csv")[1:]}
    train_pics = {img["picture"] for x in train.values() for img in x["imgs"]}
    assert [x["_id"] for x in test] == [x["_id"] for x in test0]
    for x, x0 in zip(test, test0):
        if x["_id"] in listed:
            src = train[listed[x["_id"]]]
            assert x["imgs"] == src["imgs"] and answers[x["_id"]] == src["category_id"]
        else:
            assert x == x0 and not any(img["picture"] in train_pics for img in x["imgs"])
    assert not os.path.exists(os.path.dirname(clean["test_bson"]) + "/test_duplicates.csv")


def test_sorted_order_writes_the_same_documents_sorted_by_category(tmp_path):
    """--order sorted: train.bson holds the documents of the shuffled file, byte for byte, sorted by the
    category_id written (ties in generated order); test.bson and the side files do not change."""
    shuffled = _small(tmp_path / "a", seed=2)
    rc = make_synthetic.main(["--out", str(tmp_path / "b"), "--products", "120", "--test-products", "30",
                              "--categories", "8", "--seed", "2", "--order", "sorted"])
    assert rc == 0
    a, b = _docs(shuffled["train_bson"]), _docs(tmp_path / "b" / "train.bson")
    cats = [d["category_id"] for d in b]
    assert cats == sorted(cats) and len(set(cats)) > 1
    assert b == sorted(a, key=lambda d: d["category_id"])  # stable: the generated order within a category
    assert [d["category_id"] for d in a] != cats  # the generated file is not sorted already
    for name in ("test.bson", "category_names.csv", "test_answers.csv"):
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read(), name
    with pytest.raises(ValueError, match="order"):
        synthetic.make_dataset(str(tmp_path / "c"), products=4, test_products=0, categories=2, order="random")


# ---- text categories (--text-categories) ------------------------------------------------------------------
def test_without_text_categories_the_files_are_those_of_before(tmp_path):
    """The files of a set made without --text-categories, pinned from before the option existed. JPEG bytes
    depend on Pillow's encoder, so the pin holds for the Pillow it was taken with."""
    import hashlib

    import PIL

    if PIL.__version__ != "13.0.0":
        pytest.skip(f"pinned with Pillow 13.0.0's JPEG encoder, this is Pillow {PIL.__version__}")
    r = synthetic.make_dataset(str(tmp_path), products=60, test_products=12, categories=6, seed=5)
    got = {k: hashlib.sha256(v).hexdigest()[:16] for k, v in _file_bytes(r).items()}
    assert got == {"train_bson": "d92f11bd0b4d0c69", "test_bson": "eadccb7e39193074",
                   "category_names": "f6c4a2604271ae83", "test_answers": "d0f0ee83e4e08d98"}


def test_text_categories_share_a_look_and_differ_by_their_titles(tmp_path):
    from tools import synthetic_text

    plain = synthetic.make_dataset(str(tmp_path / "plain"), products=80, test_products=20, categories=6, seed=2,
                                   duplicates=0.2)
    r = synthetic.make_dataset(str(tmp_path / "text"), products=80, test_products=20, categories=6, seed=2,
                               text_categories=3, duplicates=0.2)
    table = _read_csv(r["category_names"])[1:]
    assert [row[1:3] for row in table[3:]] == [[synthetic_text.TEXT_LEVEL1, synthetic_text.TEXT_LEVEL2]] * 3
    assert table[:3] == _read_csv(plain["category_names"])[1:4]  # the others keep their names and ids
    text_ids = {int(row[0]): k for k, row in enumerate(table[3:])}
    vocab = synthetic_text.vocabularies(3)
    rows = _read_csv(r["titles"])
    assert rows[0] == synthetic_text.TITLES_HEADER
    titles = {(int(a), int(b)): (s, t) for a, b, s, t in rows[1:]}
    answers = {int(a): int(c) for a, c in _read_csv(r["test_answers"])[1:]}
    pictures = 0
    for split, key in (("train", "train_bson"), ("test", "test_bson")):
        for d, p in zip(_docs(r[key]), _docs(plain[key])):
            cat = d["category_id"] if "category_id" in d else answers[d["_id"]]
            if cat in text_ids:  # every picture of a text category has its title listed, words of its vocabulary
                for j in range(len(d["imgs"])):
                    s, title = titles.pop((d["_id"], j))
                    assert s == split and 2 <= len(title.split()) <= 3
                    assert set(title.split()) <= set(vocab[text_ids[cat]])
                    pictures += 1
            else:  # the other categories' pictures are those of the set without text categories
                assert d == p
    assert not titles and pictures > 20
    looks = [Image.open(io.BytesIO(d["imgs"][0]["picture"])).convert("RGB") for d in _docs(r["train_bson"])
             if d["category_id"] in text_ids]
    blue = [np.mean(np.asarray(im, np.int16) @ np.array([-1, 0, 1]) > 80) for im in looks]  # the cover's colour
    assert min(blue) > 0.3  # every one of them shows the one blue look
    again = synthetic.make_dataset(str(tmp_path / "again"), products=80, test_products=20, categories=6, seed=2,
                                   text_categories=3, duplicates=0.2)
    assert _file_bytes(again) == _file_bytes(r) and open(again["titles"], "rb").read() == open(r["titles"], "rb").read()


def test_text_vocabularies_overlap_so_that_word_pairs_tell_the_category():
    from tools import synthetic_text

    for n in (2, 8, synthetic_text.MAX_TEXT_CATEGORIES):
        vocab = synthetic_text.vocabularies(n)
        owners = collections.Counter(w for v in vocab for w in v)
        assert set(owners.values()) == ({2, 3} if n > 3 else {n - 1})  # never in all: that would tell none
        assert min(len(v) for v in vocab) >= synthetic_text.WORDS_PER_CATEGORY - 2
        assert len({frozenset(v) for v in vocab}) == n  # no two categories read alike
        accented = sum(synthetic_text.has_accent(w) for w in owners)
        assert 0.2 < accented / len(owners) < 0.8
    with pytest.raises(ValueError):
        synthetic_text.vocabularies(synthetic_text.MAX_TEXT_CATEGORIES + 1)
    with pytest.raises(SystemExit):
        make_synthetic.main(["--out", "unused", "--categories", "3", "--text-categories", "4"])
