"""The one model registry: `@register_model` adds an entry, `create_model` builds one, `list_models` lists them.

An entry is a function `fn(num_classes, head="first", **kw) -> Net`; the entries themselves are in zoo.py.
"""
from __future__ import annotations

import os
from typing import Callable

import torch.nn as nn

from .pretrained import load_pretrained

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable | None = None, *, name: str | None = None):
    """Decorator (`@register_model` or `@register_model(name=...)`); a name registered twice is an error."""
    def add(fn: Callable) -> Callable:
        key = name or fn.__name__
        if key in _MODELS:
            other = _MODELS[key]
            raise ValueError(f"model {key!r} is already registered by {other.__module__}.{other.__qualname__}")
        _MODELS[key] = fn
        return fn
    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, head: str = "first",
                 pretrained: str | os.PathLike | None = None, **kw) -> nn.Module:
    """Build model `name` with `num_classes` outputs and `head` ("first", "vgg" or "linear").

    `pretrained`: path of a local checkpoint whose trunk tensors are loaded (the new head stays initialized;
    use load_pretrained directly to load a whole checkpoint, head included). Other `kw` go to the entry:
    `vgg_width`/`vgg_dropout` to the vgg head, `wide` to inception_resnet_v2, the rest to timm."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be the path of a local checkpoint (nothing is downloaded), "
                        f"not {pretrained!r}")
    model = _MODELS[name](num_classes=num_classes, head=head, **kw)
    if pretrained:
        load_pretrained(model, pretrained, skip=model.new_names)
    return model
