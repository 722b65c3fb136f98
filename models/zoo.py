"""The registered models: timm trunks of the 1st-place solution and its ensemble, and a tiny one for the demo.

Every entry takes `head` ("first": the 1st-place head, "vgg", "linear") and passes `vgg_*` keywords and
`aux_classes` (hierarchy heads, `{"level1": C1, ...}`) and `text_branch` (`{"buckets": B, "dim": D}`: the
OCR text branch) to the head and the other keywords to timm.
"""
from __future__ import annotations

from .heads import build
from .registry import register_model
from .trunks import Trunk, timm_trunk, tiny_trunk, widen_last_conv


def _make(trunk_fn, num_classes: int, head: str, kw: dict):
    head_kw = {k: kw.pop(k) for k in list(kw) if k.startswith("vgg_") or k in ("aux_classes", "text_branch")}
    trunk: Trunk = trunk_fn(**kw)
    return build(trunk, num_classes, head, **head_kw)


def _timm(name: str):
    return lambda **kw: timm_trunk(name, **kw)


@register_model
def tiny(num_classes: int, head: str = "first", **kw):
    """Half-width resnet10t (~0.28 GFLOP at 160x160): the CPU demo and tests."""
    return _make(tiny_trunk, num_classes, head, kw)


@register_model
def resnet10t(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet10t"), num_classes, head, kw)


@register_model
def resnet18(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet18"), num_classes, head, kw)


@register_model
def resnet34(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet34"), num_classes, head, kw)


@register_model
def resnet50(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet50"), num_classes, head, kw)


@register_model
def resnet101(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet101"), num_classes, head, kw)


@register_model
def resnet152(num_classes: int, head: str = "first", **kw):
    return _make(_timm("resnet152"), num_classes, head, kw)


@register_model
def inception_resnet_v2(num_classes: int, head: str = "first", wide: bool = False, **kw):
    """wide=True: conv2d_7b widened from 1536 to 4096 channels as in the 1st place (that conv then starts
    untrained and counts as new)."""
    def trunk_fn(**trunk_kw):
        trunk = timm_trunk("inception_resnet_v2", **trunk_kw)
        return widen_last_conv(trunk, "conv2d_7b", 4096) if wide else trunk
    return _make(trunk_fn, num_classes, head, kw)


@register_model
def inception_v4(num_classes: int, head: str = "first", **kw):
    return _make(_timm("inception_v4"), num_classes, head, kw)


@register_model
def densenet161(num_classes: int, head: str = "first", **kw):
    return _make(_timm("densenet161"), num_classes, head, kw)


@register_model
def densenet169(num_classes: int, head: str = "first", **kw):
    return _make(_timm("densenet169"), num_classes, head, kw)


@register_model
def dpn92(num_classes: int, head: str = "first", **kw):
    return _make(_timm("dpn92"), num_classes, head, kw)
