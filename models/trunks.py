"""Trunks: timm models cut before their pooling and classifier.

A trunk is handed over as an ordered list of top-level modules that, applied one after the other, compute the
timm model's `forward_features`. Keeping timm's own child names (and not nesting them under `trunk.`) makes
the state_dict keys of a ResNet the torchvision ones (`conv1`, `bn1`, `layer1`..`layer4`), so ImageNet and
1st-place checkpoints load as they are. tests/test_models.py checks the order against `forward_features`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import timm
import torch.nn as nn
from timm.layers import ConvNormAct
from timm.models.resnet import BasicBlock, ResNet

# timm children that belong to its head, not to the feature extractor
_TIMM_HEAD_PARTS = ("global_pool", "head_drop", "flatten", "fc", "classifier", "classif", "last_linear", "head")


@dataclass
class Trunk:
    name: str  # timm architecture name
    modules: "OrderedDict[str, nn.Module]"  # applied in order: the timm model's forward_features
    channels: int  # channels of the last feature map
    cfg: dict  # what the ImageNet weights of this trunk expect (mean, std, input size)
    new: tuple = field(default_factory=tuple)  # trunk modules changed from timm's, so not pretrained


def split_timm(model: nn.Module, name: str) -> Trunk:
    """Take the feature modules out of a timm classifier (built with num_classes=0, global_pool='')."""
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})  # absent when built from the class
    head = set(_TIMM_HEAD_PARTS) | {pretrained_cfg.get("classifier", "")}
    modules = OrderedDict((n, m) for n, m in model.named_children() if n not in head)
    dropped = [n for n, m in model.named_children() if n in head and any(True for _ in m.parameters())]
    if dropped:  # num_classes=0 should leave only parameter-free pooling/identity behind
        raise RuntimeError(f"timm model {name}: head modules {dropped} still hold parameters")
    if any(True for _ in model.parameters(recurse=False)) or any(True for _ in model.buffers(recurse=False)):
        raise RuntimeError(f"timm model {name} keeps tensors outside its children; it cannot be split")
    keep = ("input_size", "mean", "std", "interpolation", "crop_pct", "first_conv", "classifier")
    cfg = {k: pretrained_cfg[k] for k in keep if k in pretrained_cfg}
    return Trunk(name=name, modules=modules, channels=model.num_features, cfg=cfg)


def timm_trunk(name: str, **kw) -> Trunk:
    """A trunk from timm's registry; `kw` go to timm (drop_path_rate, drop_rate, ...). Never downloads."""
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kw)
    return split_timm(model, name)


TINY_ARGS = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=16,
                 stem_type="deep_tiered", avg_down=True)


def tiny_trunk(**kw) -> Trunk:
    """Half-width resnet10t, built with timm's ResNet class: ~0.28 GFLOP per 160x160 image (resnet10t: 1.1),
    so the CPU demo trains in minutes."""
    model = ResNet(num_classes=0, global_pool="", **TINY_ARGS, **kw)
    return split_timm(model, "tiny")  # no ImageNet weights exist for it: trained from scratch


def widen_last_conv(trunk: Trunk, name: str, channels: int) -> Trunk:
    """Replace the trunk's last 1x1 ConvNormAct by a wider one (1st place: Inception-ResNet-v2's conv2d_7b at
    4096). The new module is not pretrained: its ImageNet weights have another shape and are skipped."""
    old = trunk.modules[name]
    if not isinstance(old, ConvNormAct) or old.conv.kernel_size != (1, 1):
        raise ValueError(f"{trunk.name}: {name} is not a 1x1 ConvNormAct, it cannot be widened")
    trunk.modules[name] = ConvNormAct(old.conv.in_channels, channels, kernel_size=1, padding=0,
                                      norm_kwargs=dict(eps=old.bn.eps), act_kwargs=dict(inplace=True))
    trunk.channels = channels
    trunk.new = trunk.new + (name,)
    return trunk
