"""Checkpoints: atomic writes, ``weights_only`` loads, RNG states as plain data, compatibility checks.

A checkpoint is a dict of tensors and plain values only (no pickled objects), so it loads with
``torch.load(path, weights_only=True)``:

    format, status ("running" | "finished" | "early_stopped"), step, steps_per_epoch, world_size,
    model (state dict of the unwrapped model), model_name, num_classes, category_ids,
    optimizer, scaler (state dicts), config (plain dict), best {metric, step}, loader_states, rng (per rank),
    tb_dir, input_norm {mean, std} (what the model's ``prepare_input`` applies: ``apply_input_norm``)
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import shutil
import warnings
from typing import List, Optional

import numpy as np
import torch

from dali_pipes.config import drop_legacy_keys
from dali_pipes.dataset import check_class_map
from models import without_optional
from dali_pipes.fileio import TMP_SUFFIX, atomic_open, atomic_path

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def save(obj: dict, path: str) -> None:
    """Atomic (``dali_pipes.fileio``): a crash at any moment leaves the old file or the new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def copy(src: str, dst: str) -> None:
    """Atomic copy (best.pt from last.pt without serializing twice)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def remove_stale_temps(run_dir: str) -> List[str]:
    """Temporary files of writes that a kill interrupted; they are never read."""
    stale = glob.glob(os.path.join(run_dir, f".*.pt.*{TMP_SUFFIX}"))
    for p in stale:
        os.remove(p)
    return stale


def load(path: str) -> dict:
    """The checkpoint at ``path``, loaded with ``weights_only=True``; a CheckpointError that says what the
    file is and what to pass instead for anything else (torch's own advice to load untrusted files with
    ``weights_only=False`` is never shown: a checkpoint of this trainer never needs it)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass a checkpoint file in it, e.g. "
                              f"{os.path.join(path, 'best.pt')}")
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about foreign pickles
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint; pass RUN/best.pt or RUN/last.pt of a run of "
                              "train/run.sh") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: say which, not torch's advice
        raise CheckpointError(f"{path} is not a checkpoint of this trainer: {_what_it_is(path, e)}. Pass "
                              "RUN/best.pt or RUN/last.pt written by train/run.sh (a damaged RUN/last.pt: "
                              "delete it, and the run starts over)") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer: a torch file without its fields "
                              f"(format {FORMAT}, model, ...). Pass RUN/best.pt or RUN/last.pt written by "
                              "train/run.sh")
    cfg = ckpt.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict):  # data keys of older versions
        old = cfg["data"]
        if "input_norm" not in ckpt and "mean" in old and "std" in old:
            # Trained when the loader normalized with data.mean/std, in pixel levels (0..255): the model keeps
            # those values, on its 0..1 scale.
            ckpt["input_norm"] = {"mean": [float(v) / 255.0 for v in old["mean"]],
                                  "std": [float(v) / 255.0 for v in old["std"]]}
        cfg["data"] = drop_legacy_keys(old)
    return ckpt


def apply_input_norm(ckpt: dict, model) -> None:
    """Give ``model`` (a ``models.heads.Net``) the input normalization its weights were trained with, where the
    checkpoint records one (every checkpoint of this version does; older ones by their data.mean/std)."""
    norm = ckpt.get("input_norm")
    if norm:
        model.set_input_norm(norm["mean"], norm["std"])


def _what_it_is(path: str, error: Exception) -> str:
    """A short description of a file that torch.load refused, from its first bytes and the error's type."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":  # torch's zip format
        if isinstance(error, pickle.UnpicklingError):
            return "a torch file that holds Python objects, not just tensors and plain values"
        return "a damaged or truncated torch file"
    return "not a torch file at all"


# ---- RNG states as plain data ---------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- compatibility ------------------------------------------------------------------------------
def check_model(ckpt: dict, path: str, model_name: str, head: str, model: torch.nn.Module,
                ignore_aux: bool = False) -> None:
    """Refuse a checkpoint of another architecture, head or class count, naming both sides. ``ignore_aux``:
    the hierarchy heads (``models.AUX_HEADS``) and the text branch (``models.TEXT_BRANCH``) may differ
    (``train.init_from``)."""
    theirs = f"{ckpt.get('model_name')} (head {ckpt.get('config', {}).get('model', {}).get('head')}, " \
             f"{ckpt.get('num_classes')} classes)"
    ours = f"{model_name} (head {head})"
    if ckpt.get("model_name") != model_name or ckpt.get("config", {}).get("model", {}).get("head") != head:
        raise CheckpointError(f"{path} holds model {theirs}, this run builds {ours}: use the recipe the "
                              "checkpoint was made with, or another --out for a new run")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if ignore_aux:
        want, have = without_optional(want), without_optional(have)
    if want != have:
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        shapes = [k for k in set(want) & set(have) if want[k] != have[k]][:3]
        raise CheckpointError(f"{path}: model {theirs} does not match this run's {ours}: missing {missing}, "
                              f"unexpected {extra}, other shapes {shapes}; use another --out for a new run")


def check_text(theirs: Optional[dict], path: str, hashing: Optional[dict], ocr_dir: str) -> None:
    """Refuse a checkpoint (at ``path``) whose text branch hashed its words (``theirs``: its ``text_hashing``)
    otherwise than the OCR directory ``ocr_dir`` (``hashing``: its manifest's): the ids would name other
    words. Training, predict and tools.clean check with this one function."""
    if theirs is not None and hashing is not None and theirs != hashing:
        raise CheckpointError(f"{path}: its text branch was trained on words hashed as {theirs}, but {ocr_dir} "
                              f"hashes them as {hashing}; make the OCR with the tools.ocr of the checkpoint's "
                              "version, or train the branch on this one")


def check_classes(ckpt: dict, path: str, category_ids: List[int]) -> None:
    check_class_map(list(ckpt.get("category_ids", [])), list(category_ids), f"{path} vs the data")
