"""Validation metrics against values computed by hand: the product prediction is the argmax of the MEAN of
its images' probabilities (not one image's), products longer than a batch or than 4 images, products
split between two ranks (2 gloo processes), and the memory bound (no row per product)."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from train.distributed import Dist
from train.evaluate import _ProductSums, evaluate

C = 3


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


# (product id, label, logits of each of its images), in stream order. Chosen so that the product means and
# single images disagree: product 11's last image says class 0, its mean says class 2; product 12 has 6
# images, its first three say 0 and its mean 1; product 13's first image says class 1, its mean class 0.
PRODUCTS = [
    (10, 1, [[0.0, 3.0, 0.0]]),
    (11, 2, [[0.0, 0.0, 4.0], [0.0, 0.0, 4.0], [2.0, 0.0, 0.0]]),
    (12, 0, [[1.0, 0.0, 0.0]] * 3 + [[0.0, 1.5, 0.0]] * 3),
    (13, 0, [[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]]),
    (14, 1, [[0.0, 0.0, 1.0], [0.0, 1.1, 0.0], [0.0, 1.0, 0.9]]),
]


def _by_hand(products):
    """(correct products, products, correct images, images) with plain Python."""
    pc = ic = n = 0
    for _, label, images in products:
        probs = [_softmax(r) for r in images]
        mean = [sum(p[c] for p in probs) / len(probs) for c in range(C)]
        pc += max(range(C), key=lambda c: mean[c]) == label
        ic += sum(max(range(C), key=lambda c: r[c]) == label for r in images)
        n += len(images)
    return pc, len(products), ic, n


def _stream(products):
    out = []
    for pid, label, images in products:
        out += [(pid, label, r) for r in images]
    return out


def _batches(stream, size):
    for i in range(0, len(stream), size):
        part = stream[i:i + size]
        yield (torch.tensor([r for _, _, r in part]), torch.tensor([lab for _, lab, _ in part]),
               {"product_id": torch.tensor([p for p, _, _ in part]), "image_index": torch.zeros(len(part))})


class _Identity(torch.nn.Module):  # the "images" are the logits
    def forward(self, x):
        return x


def _evaluate(batches, d):
    from contextlib import nullcontext

    return evaluate(_Identity(), list(batches), d, C, nullcontext, lambda i, lab: (i.float(), lab.long()))


def test_by_hand_values():
    pc, pn, ic, n = _by_hand(PRODUCTS)
    # the mean decides: 10, 11, 13, 14 right; 12 wrong (its first 3 images alone would say 0, right)
    assert (pc, pn, ic, n) == (4, 5, 9, 15)


@pytest.mark.parametrize("batch", [1, 2, 4, 7, 15, 100])
def test_product_accuracy_is_the_mean_of_its_images(batch):
    pc, pn, ic, n = _by_hand(PRODUCTS)
    m = _evaluate(_batches(_stream(PRODUCTS), batch), Dist())
    assert (m["products"], m["images"]) == (pn, n)
    assert m["product_acc"] == pytest.approx(pc / pn)
    assert m["image_acc"] == pytest.approx(ic / n)
    # the mean, not the last image: with product 11 alone the last image would say 0
    only11 = [p for p in PRODUCTS if p[0] == 11]
    assert _evaluate(_batches(_stream(only11), batch), Dist())["product_acc"] == 1.0


def test_memory_is_two_rows_whatever_the_split():
    sums = _ProductSums(C, torch.device("cpu"))
    for pid in range(1000):  # 1,000 one-image products in batches of 10
        if pid % 10 == 0:
            ids, probs = [], []
        ids.append(pid)
        probs.append([0.0, 1.0, 0.0])
        if pid % 10 == 9:
            sums.add(ids, torch.tensor(probs), torch.ones(10, dtype=torch.long))
    held = [t for t in vars(sums).values() if isinstance(t, torch.Tensor)]
    held += [x for e in (sums.open, sums.first) if e for x in e if isinstance(x, torch.Tensor)]
    assert sum(t.numel() for t in held) <= 2 * C + 2 + 2
    assert sums.finish(Dist()).tolist() == [1000.0, 1000.0]


# ---- two ranks ------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, streams, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _evaluate(_batches(streams[rank], 2), Dist(rank=rank, world_size=world))
        out[rank] = m
    finally:
        dist.destroy_process_group()


def test_products_split_between_ranks_are_counted_once_from_all_their_images():
    stream = _stream(PRODUCTS)
    # rank 0 reads images 0..6 (product 12's first 3 images), rank 1 the rest (12's other 3, 13, 14): the
    # cut falls inside product 12, whose images alone on either side say class 0 or 1 respectively
    streams = [stream[:7], stream[7:]]
    assert streams[0][-1][0] == streams[1][0][0] == 12
    pc, pn, ic, n = _by_hand(PRODUCTS)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, _free_port(), streams, out), nprocs=2, join=True)
        results = dict(out)
    for m in results.values():
        assert (m["products"], m["images"]) == (pn, n)
        assert m["product_acc"] == pytest.approx(pc / pn) and m["image_acc"] == pytest.approx(ic / n)
