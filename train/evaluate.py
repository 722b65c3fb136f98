"""Validation: loss, image-level accuracy and product-level accuracy (the Kaggle metric).

A product's prediction is the argmax of the mean of its images' probabilities. Each rank sums the
probabilities per product for the images it saw (one row per product, on the device); a product whose
images fell on several ranks is finished by the lowest of them after a small exchange of just those rows.
Memory: one row of ``num_classes`` floats per product of the rank's share of the val split.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .distributed import Dist, all_gather_object, all_reduce


class _ProductSums:
    """Per-product sums of probabilities, one row per product id seen, grown by doubling."""

    def __init__(self, num_classes: int, device: torch.device):
        self.rows: Dict[int, int] = {}
        self.sums = torch.zeros(256, num_classes, device=device)
        self.labels = torch.zeros(256, dtype=torch.long, device=device)

    def add(self, product_ids: List[int], probs: torch.Tensor, labels: torch.Tensor) -> None:
        idx = [self.rows.setdefault(p, len(self.rows)) for p in product_ids]
        if len(self.rows) > self.sums.shape[0]:
            n = max(len(self.rows), 2 * self.sums.shape[0])
            self.sums = torch.cat([self.sums, self.sums.new_zeros(n - self.sums.shape[0], self.sums.shape[1])])
            self.labels = torch.cat([self.labels, self.labels.new_zeros(n - self.labels.shape[0])])
        index = torch.tensor(idx, device=self.sums.device)
        self.sums.index_add_(0, index, probs)
        self.labels[index] = labels


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
        with autocast():
            logits = model(images, aux=True) if levels else model(images)
        if levels:
            logits, aux = logits
            pids = meta["product_id"].view(-1).tolist()
            for (_, index, sums), head in zip(levels, aux):
                sums.add(pids, head.float().softmax(1), index[labels])
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.numel()
        products.add(meta["product_id"].view(-1).tolist(), logits.softmax(1), labels)
    model.train(was_training)
    prod = _product_correct(products, d)
    extra = {f"{name}_acc": _product_correct(sums, d) for name, _, sums in levels}
    all_reduce(totals, d)
    loss, correct, n = totals.tolist()
    pc, pn = prod.tolist()
    out = {"loss": loss / max(n, 1), "image_acc": correct / max(n, 1), "product_acc": pc / max(pn, 1),
           "images": int(n), "products": int(pn)}
    for key, (c, m) in ((k, v.tolist()) for k, v in extra.items()):
        out[key] = c / max(m, 1)
    return out


def _product_correct(products: _ProductSums, d: Dist) -> torch.Tensor:
    """(correct products, products) over all ranks, from each rank's per-product sums."""
    dev = d.device
    # Products split across ranks: the lowest rank holding one gets the others' rows for it.
    mine = list(products.rows)
    everyone = all_gather_object(mine, d)
    owner: Dict[int, int] = {}
    for r, pids in enumerate(everyone):
        for p in pids:
            owner.setdefault(p, r)
    shared = {p: products.sums[products.rows[p]].cpu() for p in mine if owner[p] != d.rank}
    for rows in all_gather_object(shared, d):
        for p, row in rows.items():
            if owner[p] == d.rank:
                products.sums[products.rows[p]] += row.to(dev)
    owned = [products.rows[p] for p in mine if owner[p] == d.rank]
    prod = torch.zeros(2, dtype=torch.float64, device=dev)  # correct products, products
    if owned:
        index = torch.tensor(owned, device=dev)
        prod[0] = (products.sums[index].argmax(1) == products.labels[index]).sum()
        prod[1] = len(owned)
    all_reduce(prod, d)
    return prod
