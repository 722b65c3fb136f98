"""The heads put on a trunk: the 1st-place head, a VGG-style head, a plain linear classifier.

Each head is a subclass of `Net`, which registers the trunk's modules directly on the model; the head's
modules sit beside them at the top level, so a ResNet with the 1st-place head has exactly the keys of the
published 1st-place code: conv1, bn1, layer1..layer4, layer5.{0,1}, fc_p1, fc_p1_bn, fc.
Everything after the trunk is 1x1 convolution or global pooling, so any input size works (160 crops, 180
images, tiled products of 320x160 ... 320x320).

Input: the loader's batch as it comes, ``uint8 (N, H, W, 3)`` pixels on the device. ``Net.prepare_input``,
the first step of ``forward`` (so inside ``torch.compile``'s graph, and the same for training, evaluation
and prediction), normalizes with the trunk's own ImageNet mean and std (timm's ``pretrained_cfg``: Inception
trunks use 0.5/0.5, DPN its own values, ResNet/DenseNet the usual ImageNet ones; a model loaded from a
checkpoint takes the checkpoint's ``input_norm``: ``set_input_norm``), casts to the compute dtype
(autocast's, else the weights') and lays the batch out as NCHW in the stem's memory format (a free view for
channels_last). A floating-point ``(N, 3, H, W)`` input is taken as already normalized and passed through.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .trunks import Trunk

AUX_HEADS = "aux_heads"  # the hierarchy heads' module: its keys are left out where a model has none
TEXT_BRANCH = "text_branch"  # the text branch's module (model.text_branch): its keys too
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # for trunks without a pretrained config (tiny): trained from scratch
IMAGENET_STD = (0.229, 0.224, 0.225)


class Net(nn.Module):
    """Trunk modules (applied in order) + a head defined by the subclass in `_build_head`/`forward_head`."""

    head_kind = ""
    head_names: tuple = ()  # top-level modules of the head, set by subclasses

    def __init__(self, trunk: Trunk, num_classes: int, aux_classes: Optional[Dict[str, int]] = None,
                 text_branch: Optional[Dict[str, int]] = None, **head_kw):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, not {num_classes}")
        clash = set(trunk.modules) & set(self.head_names)
        if clash:
            raise ValueError(f"trunk {trunk.name} already has modules named {sorted(clash)}")
        for name, module in trunk.modules.items():
            self.add_module(name, module)
        self.trunk_names = tuple(trunk.modules)
        self.trunk_channels = trunk.channels
        self.num_classes = num_classes
        # what load_pretrained(skip=...) and param_groups treat as new (not from an ImageNet trunk)
        self.new_names = self.head_names + trunk.new
        mean = tuple(float(v) for v in trunk.cfg.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in trunk.cfg.get("std", IMAGENET_STD))
        self.default_cfg = {
            "architecture": trunk.name,
            "head": self.head_kind,
            "num_classes": num_classes,
            "input_size": (3, 160, 160),  # the 1st-place training crop; any size works
            "input": "uint8 (N, H, W, 3) pixels, normalized by prepare_input",
            "mean": mean,  # what prepare_input subtracts (0..1 scale) ...
            "std": std,  # ... and divides by: the trunk's pretrained config
            "pretrained_cfg": trunk.cfg,  # what the trunk's ImageNet weights were trained with
        }
        self._build_head(trunk.channels, num_classes, **head_kw)
        assert tuple(n for n, _ in self.named_children())[len(self.trunk_names):] == self.head_names
        # Hierarchy heads (train model.aux_levels): one Linear per level on the pooled trunk features, keyed
        # by level ("level1": C1 classes, ...). Trained beside the head; forward(x) ignores them.
        if aux_classes:
            self.aux_heads = nn.ModuleDict({k: nn.Linear(trunk.channels, int(n)) for k, n in aux_classes.items()})
            self.new_names += (AUX_HEADS,)
        # The text branch (model.text_branch): the OCR words of the picture, embedded and added to the
        # head's first layer (``join_width``, set by _build_head). forward(x) without text leaves it out.
        if text_branch:
            # drawn from a fork of the RNG: every other weight is the one a model without the branch gets from
            # the same seed, so the two compare on the branch alone
            with torch.random.fork_rng(devices=[]):
                self.text_branch = TextBranch(int(text_branch["buckets"]), int(text_branch["dim"]), self.join_width)
            self.new_names += (TEXT_BRANCH,)
        # x * scale - shift == (x / 255 - mean) / std, filled in by set_input_norm. Not persistent: checkpoint
        # keys stay those of the published models, and a checkpoint of any version loads.
        self.register_buffer("input_scale", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.empty(1, 3, 1, 1), persistent=False)
        self.set_input_norm(mean, std)
        # The stem's weight: the input follows its dtype (without autocast) and memory format.
        self._stem = next(n for n, p in self.named_parameters() if p.dim() == 4)

    def _build_head(self, channels: int, num_classes: int) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.trunk_names:
            x = self._modules[name](x)
        return x

    def forward_head(self, x: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits from the trunk's features; ``text``: the text branch's ``(N, join_width)`` output,
        added to the head's first layer (the same as one layer over the two joined)."""
        raise NotImplementedError

    def input_norm(self) -> dict:
        """``{"mean": [3 floats], "std": [3 floats]}`` that ``prepare_input`` applies (0..1 scale)."""
        return {"mean": list(self.default_cfg["mean"]), "std": list(self.default_cfg["std"])}

    def set_input_norm(self, mean, std) -> None:
        """Normalize with ``mean``/``std`` (0..1 scale, 3 values each) instead of the trunk's: for weights
        trained with other values (checkpoints record theirs: ``train.checkpoint.apply_input_norm``)."""
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"input normalization needs 3 means and 3 positive stds, not {mean} / {std}")
        self.default_cfg.update(mean=mean, std=std)
        self.input_scale.copy_(torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))
        self.input_shift.copy_(torch.tensor([m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, H, W, 3)`` pixels -> normalized ``(N, 3, H, W)`` in the compute dtype, channels_last
        when the model is. Floating-point ``(N, 3, H, W)`` input is returned as it is (already normalized)."""
        if x.dtype != torch.uint8:
            if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{type(self).__name__} takes uint8 (N, H, W, 3) pixels or normalized floating "
                                 f"(N, 3, H, W), not {x.dtype} {tuple(x.shape)}")
            return x
        if x.dim() != 4 or x.shape[3] != 3:
            raise ValueError(f"{type(self).__name__}: uint8 input must be (N, H, W, 3) pixels, not {tuple(x.shape)}")
        stem = self.get_parameter(self._stem)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else stem.dtype
        x = (x.permute(0, 3, 1, 2).float() * self.input_scale - self.input_shift).to(dtype)  # NCHW view of NHWC
        if not stem.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        return x

    def forward(self, x: torch.Tensor, text: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, aux: bool = False):
        """Class logits; with ``aux=True`` ``(class logits, [logits of each hierarchy head])`` (an empty list
        without hierarchy heads). ``text``: the batch's OCR input ``(ids, offsets)`` (``torch.nn.EmbeddingBag``'s
        input and the start of each picture's ids: the loader's, ``dali_pipes.ocr_files.TextLookup``), read by
        a model with a text branch; one without takes none."""
        f = self.forward_features(self.prepare_input(x))
        t, branch = None, self._modules.get(TEXT_BRANCH)
        if branch is not None:
            if text is None:
                raise ValueError(f"{type(self).__name__} has a text branch: pass the batch's OCR input, "
                                 "model(images, text=(ids, offsets))")
            t = branch(*text)
        elif text is not None:
            raise ValueError(f"{type(self).__name__} has no text branch, yet was given text input")
        out = self.forward_head(f, t)
        if not aux:
            return out
        heads = self._modules.get(AUX_HEADS)
        if heads is None:
            return out, []
        pooled = _pool(f)
        return out, [h(pooled) for h in heads.values()]


def _pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _join(x: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
    return x if text is None else x + text.to(x.dtype)


class TextBranch(nn.Module):
    """A picture's OCR words and their character n-grams (hashed ids, ``dali_pipes.ocr_files.text_ids``)
    averaged in an ``EmbeddingBag`` of ``dim``, then Linear + ReLU and a Linear to ``out`` (the head's first
    layer width). That last Linear starts at zero, so a model fine-tuned from one without the branch
    (``train.init_from``) starts with the same outputs. A picture without text has an empty bag: zeros."""

    def __init__(self, buckets: int, dim: int, out: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        nn.init.normal_(self.embed.weight, std=0.1)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        e = self.embed(ids, offsets)
        return self.out(F.relu(self.hidden(e), inplace=True))


class FirstPlaceNet(Net):
    """1x1 conv to C + BN + ReLU, global average pool, Linear(C, C) + BN1d + ReLU, Linear(C, C).

    The 1x1 conv before pooling lets the head see each position with C channels (5,270 in the competition)
    instead of squeezing the trunk's 2,048 channels through one Linear."""

    head_kind = "first"
    head_names = ("layer5", "fc_p1", "fc_p1_bn", "fc")

    def _build_head(self, channels: int, num_classes: int) -> None:
        c = self.join_width = num_classes
        self.layer5 = nn.Sequential(nn.Conv2d(channels, c, 1, bias=False), nn.BatchNorm2d(c),
                                    nn.ReLU(inplace=True))
        self.fc_p1 = nn.Linear(c, c)
        self.fc_p1_bn = nn.BatchNorm1d(c)
        self.fc = nn.Linear(c, c)

    def forward_head(self, x: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = _pool(self.layer5(x))
        x = F.relu(self.fc_p1_bn(_join(self.fc_p1(x), text)), inplace=True)
        return self.fc(x)


class VggNet(Net):
    """Global average pool, two FC layers of `width` (4096 as in VGG) with ReLU and dropout, then Linear to C.
    Used by the 1st place for ensemble variety; `vgg_width` shrinks it for tests."""

    head_kind = "vgg"
    head_names = ("fc6", "fc7", "head_drop", "fc")

    def _build_head(self, channels: int, num_classes: int, vgg_width: int = 4096,
                    vgg_dropout: float = 0.5) -> None:
        self.join_width = vgg_width
        self.fc6 = nn.Linear(channels, vgg_width)
        self.fc7 = nn.Linear(vgg_width, vgg_width)
        self.head_drop = nn.Dropout(vgg_dropout)
        self.fc = nn.Linear(vgg_width, num_classes)

    def forward_head(self, x: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.head_drop(F.relu(_join(self.fc6(_pool(x)), text), inplace=True))
        x = self.head_drop(F.relu(self.fc7(x), inplace=True))
        return self.fc(x)


class LinearNet(Net):
    """The baseline: global average pool and one Linear, as the trunk's ImageNet classifier."""

    head_kind = "linear"
    head_names = ("fc",)

    def _build_head(self, channels: int, num_classes: int) -> None:
        self.join_width = num_classes
        self.fc = nn.Linear(channels, num_classes)

    def forward_head(self, x: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _join(self.fc(_pool(x)), text)


HEADS = {"first": FirstPlaceNet, "vgg": VggNet, "linear": LinearNet}


def without_aux(state_dict: dict) -> dict:
    """A state dict without the hierarchy heads' tensors (for a model built without them)."""
    prefix = AUX_HEADS + "."
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


OPTIONAL_PREFIXES = (AUX_HEADS + ".", TEXT_BRANCH + ".")  # modules that train.init_from may add or leave out


def without_optional(state_dict: dict) -> dict:
    """A state dict without the hierarchy heads' and the text branch's tensors."""
    return {k: v for k, v in state_dict.items() if not k.startswith(OPTIONAL_PREFIXES)}


def build(trunk: Trunk, num_classes: int, head: str = "first", **head_kw) -> Net:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return HEADS[head](trunk, num_classes, **head_kw)
