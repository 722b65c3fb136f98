"""Local pretrained weights and the parameter groups that separate them from the new layers.

Weights are read from local files only (.pth/.pt/.bin with torch.load(weights_only=True), or .safetensors);
nothing is downloaded. Whatever does not fit is skipped and reported, never silently.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model")  # keys under which checkpoints commonly keep the state_dict
_PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and by torch.compile


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP/DataParallel or torch.compile wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def read_state_dict(path: str | Path) -> dict:
    """The tensors of a local checkpoint: a plain state_dict or a dict holding one under state_dict/model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (weights are read from local files only: "
                                "download them elsewhere, e.g. torchvision/timm ImageNet weights, and pass "
                                "the path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj = load_file(str(path), device="cpu")
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; use .pth, .pt or .safetensors")
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors found (keys: {list(obj)[:10]})")
    dropped = len(obj) - len(tensors)
    if dropped:
        log.info("%s: ignored %d non-tensor entries", path, dropped)
    for prefix in _PREFIXES:  # strip a wrapper prefix only when every key has it
        while all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _is_skipped(key: str, skip) -> bool:
    # a skip entry names a module ("fc" covers fc.weight, not fc_p1.weight) or a single tensor
    return any(key == s or key.startswith(s + ".") for s in skip)


def _modules_of(keys) -> str:
    names = sorted({k.split(".")[0] for k in keys})
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def load_pretrained(model: nn.Module, path: str | Path, skip=()) -> dict:
    """Copy the tensors of a local checkpoint into `model` where name and shape match.

    `skip`: module names (or tensor names) not to load, e.g. the head. Returns
    {"loaded", "missing", "unexpected", "shape_mismatch", "skipped"}: every model tensor not loaded is in
    exactly one of missing/shape_mismatch/skipped, every checkpoint tensor not used in one of
    unexpected/shape_mismatch/skipped. A checkpoint that matches nothing is an error."""
    if isinstance(skip, str):
        skip = (skip,)
    source = read_state_dict(path)
    model = _unwrap(model)
    target = model.state_dict()
    report = {"loaded": [], "missing": [], "unexpected": [], "shape_mismatch": [], "skipped": []}
    chosen = {}
    for key, value in source.items():
        if _is_skipped(key, skip):
            report["skipped"].append(key)
        elif key not in target:
            report["unexpected"].append(key)
        elif value.shape != target[key].shape:
            report["shape_mismatch"].append(
                f"{key}: checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)}")
        else:
            chosen[key] = value
    # BatchNorm's num_batches_tracked is a counter that older checkpoints lack; it changes no output
    absent = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    report["missing"] = [k for k in absent if not _is_skipped(k, skip)]
    report["skipped"] += [k for k in absent if _is_skipped(k, skip)]
    if not chosen:
        raise ValueError(f"{path}: none of its {len(source)} tensors fits {type(model).__name__} "
                         f"(checkpoint modules: {_modules_of(source)}); wrong file or wrong model?")
    model.load_state_dict(chosen, strict=False)
    report["loaded"] = list(chosen)

    not_loaded = [k for k in target if k not in chosen and not k.endswith("num_batches_tracked")]
    left = f"; left as initialized: {_modules_of(not_loaded)}" if not_loaded else ""
    print(f"load_pretrained {path}: loaded {len(chosen)}/{len(target)} tensors; missing {len(report['missing'])}, "
          f"unexpected {len(report['unexpected'])}, shape mismatch {len(report['shape_mismatch'])}, "
          f"skipped {len(report['skipped'])}{left}")
    for kind in ("missing", "unexpected", "shape_mismatch", "skipped"):
        if report[kind]:
            log.info("load_pretrained %s: %s (%d): %s", path, kind, len(report[kind]), ", ".join(report[kind]))
    return report


def param_groups(model: nn.Module) -> dict:
    """{"pretrained": trunk parameters, "new": head (and widened trunk) parameters}, for separate learning
    rates. Membership is by top-level module name, the same names load_pretrained skips via create_model."""
    model = _unwrap(model)
    new_names = set(getattr(model, "new_names", ()))
    groups = {"pretrained": [], "new": []}
    for name, param in model.named_parameters():
        groups["new" if name.split(".")[0] in new_names else "pretrained"].append(param)
    return groups
