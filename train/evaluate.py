"""Validation: loss, image-level accuracy and product-level accuracy (the Kaggle metric).

A product's prediction is the argmax of the mean of its images' probabilities. The evaluation loaders
yield each product's images one after another, so every batch is reduced on the device as it comes: the
products it completes are scored at once (``_ProductSums``). A product whose images fell on two ranks (at
most the first and last product of each rank's range) is finished after the loop, from a small exchange of
just those rows. Memory: one batch of sums and two rows of ``num_classes`` per rank, whatever the split.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import Dist, all_gather_object, all_reduce


class _ProductSums:
    """Product-level correctness from a stream of images in which each product's images are consecutive (the
    evaluation loaders' file order; a rank reads one contiguous range of the split).

    Each batch is reduced on the device: its images' probabilities are summed per run of equal product ids,
    and every product that is complete (the stream has moved past it) is scored at once. Only two rows are
    kept: the product still open, and the rank's first product, whose images may have begun on the
    previous rank; ``finish`` exchanges those few rows between the ranks and scores them. Memory: one batch
    of sums and two rows of ``num_classes``, whatever the size of the split."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct products, products
        self.open: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None  # (id, row of sums, label)
        self.first: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None
        self.started = False

    def add(self, product_ids, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """``product_ids``: the batch's ids (a tensor or a sequence of ints), in loader order."""
        ids, _, starts, sums = product_runs(product_ids, probs.float())
        if not len(ids):
            return
        glabels = labels[torch.from_numpy(starts).to(labels.device)]
        ids = ids.tolist()
        if self.open is not None:
            pid, row, label = self.open
            if ids[0] == pid:
                sums[0] += row
            else:  # the open product ended with the last batch
                self._close(pid, row.unsqueeze(0), label.view(1))
        # every run but the last is complete; the last may go on in the next batch
        if len(ids) > 1:
            self._close(ids[0], sums[:-1], glabels[:-1])
        self.open = (ids[-1], sums[-1], glabels[-1])

    def _close(self, first_id: int, sums: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.started:  # the rank's first product: scored in finish, with the previous rank's part
            self.started = True
            self.first = (first_id, sums[0], labels[0])
            sums, labels = sums[1:], labels[1:]
        if sums.shape[0]:
            self.counts[0] += (sums.argmax(1) == labels).sum()
            self.counts[1] += sums.shape[0]

    def finish(self, d: Dist) -> torch.Tensor:
        """(correct products, products) over all ranks."""
        edge = [e for e in (self.first, self.open) if e is not None]
        mine = [(pid, row.cpu(), int(label)) for pid, row, label in edge]
        merged: Dict[int, list] = {}
        for rows in all_gather_object(mine, d):  # rank order: a product split over ranks is added up once
            for pid, row, label in rows:
                if pid in merged:
                    merged[pid][0] = merged[pid][0] + row
                else:
                    merged[pid] = [row, label]
        counts = self.counts.clone()
        if d.rank == 0 and merged:  # the same edge products on every rank: counted by rank 0 only
            rows = torch.stack([r for r, _ in merged.values()])
            labels = torch.tensor([lab for _, lab in merged.values()])
            counts[0] += int((rows.argmax(1) == labels).sum())
            counts[1] += len(merged)
        return all_reduce(counts, d)


def product_runs(product_ids, probs: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """The runs of equal consecutive product ids in one batch (a product's images come one after another):
    ``(ids, image counts, first positions)`` on the host and the runs' probability sums ``(runs, C)`` on
    ``probs``' device, from one ``index_add_`` (no Python step per image). Shared by validation and predict."""
    pids = torch.as_tensor(product_ids, dtype=torch.int64).view(-1).cpu()
    if pids.numel() == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, probs[:0]
    ids, counts = torch.unique_consecutive(pids, return_counts=True)
    run = torch.repeat_interleave(torch.arange(len(ids)), counts).to(probs.device, non_blocking=True)
    sums = probs.new_zeros(len(ids), probs.shape[1]).index_add_(0, run, probs)
    counts = counts.numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return ids.numpy(), counts, starts, sums


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, d: Dist, num_classes: int, autocast: Callable[[], AbstractContextManager],
             prepare: Callable, level_maps: Optional[Dict[str, tuple]] = None) -> Dict[str, float]:
    """``prepare(images, labels) -> (images, labels)`` puts a batch on the device in the model's layout.

    ``level_maps`` (``{"level1": (classes, class -> level class tensor)}``, the model's hierarchy heads in
    order) adds each level's product accuracy (``level1_acc``, ...), from the heads' own probabilities.

    ``model`` must be the unwrapped module: ranks may see different numbers of batches, so no collective
    may run inside the loop (DDP's forward would broadcast buffers)."""
    was_training = model.training
    model.eval()
    dev = d.device
    totals = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct images, images
    products = _ProductSums(num_classes, dev)
    levels = [(name, index, _ProductSums(n, dev)) for name, (n, index) in (level_maps or {}).items()]
    for images, labels, meta in loader:
        images, labels = prepare(images, labels)
        kw = {"text": meta["text"]} if "text" in meta else {}  # a model with a text branch: its OCR input
        with autocast():
            logits = model(images, aux=True, **kw) if levels else model(images, **kw)
        if levels:
            logits, aux = logits
            for (_, index, sums), head in zip(levels, aux):
                sums.add(meta["product_id"], head.float().softmax(1), index[labels])
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.numel()
        products.add(meta["product_id"], logits.softmax(1), labels)
    model.train(was_training)
    prod = products.finish(d)
    extra = {f"{name}_acc": sums.finish(d) for name, _, sums in levels}
    all_reduce(totals, d)
    loss, correct, n = totals.tolist()
    pc, pn = prod.tolist()
    out = {"loss": loss / max(n, 1), "image_acc": correct / max(n, 1), "product_acc": pc / max(pn, 1),
           "images": int(n), "products": int(pn)}
    for key, (c, m) in ((k, v.tolist()) for k, v in extra.items()):
        out[key] = c / max(m, 1)
    return out
