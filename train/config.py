"""The training config: typed dataclasses, strict YAML loading and ``section.key=value`` overrides.

A recipe is one YAML file in ``train/configs/`` (or any path). Every key must be a field below and every
value must have the field's type: an unknown key or a wrong type is an error that names the key. The
resolved config is written into the run directory and stored in each checkpoint as a plain dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from dali_pipes.config import DataConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
AMP_MODES = ("bf16", "fp16", "off")
HEADS = ("first", "vgg", "linear")
EARLY_STOP_METRICS = ("product_acc", "image_acc")
AUX_LEVELS = (1, 2)  # hierarchy levels with a head of their own (dali_pipes.dataset.LEVELS)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")  # torch.compile(mode=...)


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key (and the file)."""


@dataclass
class ModelConfig:
    name: str = "resnet50"  # a name from models.list_models()
    head: str = "first"  # first (1st-place head) | vgg | linear
    pretrained: Optional[str] = None  # local path to trunk weights; never downloaded
    channels_last: bool = True  # NHWC memory format for the model and its input
    compile: bool = False  # torch.compile the (DDP-wrapped) model
    # torch.compile's mode: default | max-autotune-no-cudagraphs | reduce-overhead (CUDA graphs of forward
    # and backward; the fused Adam step stays outside them); `bench tune` tries them on a GPU
    compile_mode: str = "default"
    sync_bn: bool = False  # SyncBatchNorm across ranks (only with more than one process)
    aux_levels: List[int] = field(default_factory=list)  # hierarchy heads: [1, 2] adds a head per level
    # The OCR text branch: each picture's words read by tools.ocr (DATA/ocr) embedded and joined to the
    # head's first layer; text_dim: the width of the word embedding
    text_branch: bool = False
    text_dim: int = 64


@dataclass
class OptimConfig:
    # Adam with a stepped lr: [epoch, lr] pairs, the lr of the last pair whose epoch is <= the position
    # (completed epochs, fractional). The 1st-place seed schedule:
    lr_schedule: List[List[float]] = field(
        default_factory=lambda: [[0.0, 3e-4], [7.0, 1e-4], [9.0, 5e-5], [11.0, 1e-5]])
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start * lr to lr
    warmup_start: float = 0.1
    pretrained_lr_mult: float = 1.0  # lr multiplier of the trunk's parameters (models.param_groups)
    new_lr_mult: float = 1.0  # lr multiplier of the new (head) parameters
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    fused: bool = True  # fused Adam kernel where torch has one for the device
    grad_clip: float = 0.0  # max global grad norm; 0: no clipping
    label_smoothing: float = 0.0
    aux_weight: float = 0.5  # weight of each hierarchy head's cross-entropy (model.aux_levels)


@dataclass
class TrainConfig:
    epochs: float = 11.5  # fractional epochs end mid-epoch
    amp: str = "bf16"  # bf16 | fp16 (with a GradScaler) | off
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (bit-exact resume on CPU)
    num_threads: int = 0  # torch intra-op threads per process; 0: torch's default
    init_from: Optional[str] = None  # checkpoint whose model weights start a new run (fine-tuning)
    log_every: int = 50  # steps between progress lines (and the only host syncs of the loop)
    val_every_steps: int = 0  # validate every N steps too (0: only at epoch ends)
    ckpt_every_steps: int = 1000  # write RUN/last.pt every N steps (and at every validation and epoch end)
    tensorboard: bool = True  # write RUN/tb if tensorboard is installed
    max_steps: int = 0  # stop after this many steps in total (0: no limit; for benchmarks and tests)
    # several processes: a collective that waits longer than this for another process (a node that died,
    # hung or went away) ends the run with exit status 4 instead of hanging
    dist_timeout_s: float = 600.0


@dataclass
class EarlyStopConfig:
    after_epoch: Optional[float] = None  # from this epoch on, every validation checks the rule; null: off
    min_val_acc: float = 0.0  # ... and stop the run if the metric is below this
    metric: str = "product_acc"  # product_acc | image_acc


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def validate(self) -> None:
        self.data.validate()
        if self.model.head not in HEADS:
            raise ConfigError(f"model.head must be one of {', '.join(HEADS)}, not {self.model.head!r}")
        if self.model.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, not "
                              f"{self.model.compile_mode!r}")
        lv = self.model.aux_levels
        if any(v not in AUX_LEVELS for v in lv) or len(set(lv)) != len(lv):
            raise ConfigError(f"model.aux_levels must list distinct levels out of {list(AUX_LEVELS)} "
                              f"(category_level1, category_level2), not {lv}")
        if self.model.text_dim < 1:
            raise ConfigError(f"model.text_dim must be >= 1, not {self.model.text_dim}")
        if self.model.text_branch and self.data.backend == "synthetic":
            raise ConfigError("model.text_branch needs the OCR of a DATA directory (tools.ocr), not "
                              "data.backend=synthetic")
        if self.optim.aux_weight < 0:
            raise ConfigError("optim.aux_weight must be >= 0")
        if self.train.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, not {self.train.amp!r}")
        if not 0 < self.train.epochs < math.inf:
            raise ConfigError(f"train.epochs must be a number > 0, not {self.train.epochs}")
        for key in ("log_every", "ckpt_every_steps", "val_every_steps", "num_threads", "max_steps"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if self.train.log_every == 0:
            raise ConfigError("train.log_every must be >= 1")
        if not 0 < self.train.dist_timeout_s < math.inf:
            raise ConfigError(f"train.dist_timeout_s must be a number of seconds > 0, not {self.train.dist_timeout_s}")
        if self.early_stop.metric not in EARLY_STOP_METRICS:
            raise ConfigError(f"early_stop.metric must be one of {', '.join(EARLY_STOP_METRICS)}")
        sched = self.optim.lr_schedule
        if not sched or any(len(p) != 2 for p in sched):
            raise ConfigError("optim.lr_schedule must be a non-empty list of [epoch, lr] pairs")
        if sched[0][0] != 0:
            raise ConfigError("optim.lr_schedule must start at epoch 0 (e.g. [[0, 3e-4], [7, 1e-4]])")
        if any(b[0] <= a[0] for a, b in zip(sched, sched[1:])):
            raise ConfigError("optim.lr_schedule epochs must increase")
        if len(self.optim.betas) != 2:
            raise ConfigError("optim.betas must be two numbers")
        if self.optim.warmup_epochs < 0 or not 0 < self.optim.warmup_start <= 1:
            raise ConfigError("optim.warmup_epochs must be >= 0 and optim.warmup_start in (0, 1]")


# ---- typed conversion ---------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` or a ConfigError naming ``key``.

    Strict, with one convenience: a float field takes an int, or a string that parses as a float,
    because YAML 1.1 reads ``3e-4`` (no dot) as a string."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            raise ConfigError(f"{key}: expected str, got the YAML boolean {value!r}; quote the word (\"off\")")
    else:
        raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(known)}")


def _fill(obj, values: Dict[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise _unknown(key, list(fields))
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _fill(cur, v, key + ".")
        else:
            setattr(obj, k, _convert(v, hints[k], key))


def to_dict(cfg: Config) -> dict:
    """Plain dict (str, int, float, bool, None, lists, dicts): YAML-, JSON- and weights_only-safe."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict, where: str = "config") -> Config:
    cfg = Config()
    try:
        _fill(cfg, values or {}, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


# ---- recipes and overrides ----------------------------------------------------------------------
def recipe_path(recipe: str) -> str:
    """A recipe name (a file in train/configs/) or a path to a YAML."""
    if os.path.isfile(recipe):
        return recipe
    named = os.path.join(CONFIG_DIR, f"{recipe}.yaml")
    if os.path.sep not in recipe and os.path.isfile(named):
        return named
    raise ConfigError(f"recipe {recipe!r}: no such file and no {recipe}.yaml in {CONFIG_DIR}; "
                      f"recipes: {', '.join(list_recipes())}")


def list_recipes() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def parse_override(text: str) -> Tuple[List[str], str]:
    """``section.key=value`` -> (["section", "key"], "value")."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.epochs=2)")
    return parts, raw


def apply_override(cfg: Config, text: str) -> None:
    """Set one ``section.key=value``. The value is read for the field's type: a string field takes the
    text as it is (``train.amp=off``; ``null`` for none), any other is read as YAML (``true``, ``1e-4``,
    ``[[0, 1e-3], [2, 1e-4]]``) and then checked like a recipe value."""
    parts, raw = parse_override(text)
    obj = cfg
    for i, p in enumerate(parts[:-1]):
        sections = [f.name for f in dataclasses.fields(obj) if dataclasses.is_dataclass(getattr(obj, f.name))]
        if p not in sections:
            raise _unknown(".".join(parts[:i + 1]), sections)
        obj = getattr(obj, p)
    name, key = parts[-1], ".".join(parts)
    fields = sorted(f.name for f in dataclasses.fields(obj))
    if name not in fields or dataclasses.is_dataclass(getattr(obj, name)):
        raise _unknown(key, fields)
    tp = typing.get_type_hints(type(obj))[name]
    is_str = tp is str or typing.get_args(tp) == (str, type(None))
    if is_str:
        value = None if raw.strip() in ("null", "~", "None") and tp is not str else raw
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    setattr(obj, name, _convert(value, tp, key))


def load_config(recipe: str, overrides: Sequence[str] = ()) -> Config:
    """The recipe's values over the defaults, then the overrides, checked."""
    path = recipe_path(recipe)
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = from_dict(values, path)
    for text in overrides:
        try:
            apply_override(cfg, text)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith("override") else f"override {text!r}: {msg}") from None
    try:
        cfg.validate()
    except ValueError as e:
        where = f"{path} with overrides {' '.join(overrides)}" if overrides else path
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


# ---- the checks before a run starts -------------------------------------------------------------
def default_run_dir(recipe: str) -> str:
    """``runs/RECIPE`` (the recipe's file name without .yaml)."""
    return os.path.join("runs", os.path.splitext(os.path.basename(recipe))[0])


def check_data(cfg: Config) -> None:
    """The run's data directory: given, a finished labelled repack, with the shards the recipe reads.
    Reads the manifest and classes.csv only (the loader checks every shard's index)."""
    if cfg.data.backend == "synthetic":
        return
    path = cfg.data.path
    if not path:
        raise ConfigError("a data directory is required: pass --data DATA (a directory made by "
                          "python -m tools.repack) or set data.path in the recipe")
    from dali_pipes.dataset import DatasetError, open_dataset

    try:
        ds = open_dataset(path)
        if not ds.manifest.get("labelled"):
            raise ConfigError(f"{path} is an unlabelled repack (made with --unlabelled, for predict); train on a "
                              "repack of train.bson made with --categories")
        ds.shard_infos("train", cfg.data.tiled_k)
        if cfg.model.text_branch:
            from dali_pipes.ocr_files import require_manifest

            require_manifest(path)
    except DatasetError as e:
        raise ConfigError(str(e)) from None


def registered_model_names() -> List[str]:
    """The model names ``models/zoo.py`` registers (``@register_model`` or ``@register_model(name=...)``),
    read from its source: importing ``models`` takes seconds (torch, timm), too slow for run.sh's check."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "zoo.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in tree.body:
        for dec in getattr(node, "decorator_list", []):
            call = dec if isinstance(dec, ast.Call) else None
            target = call.func if call else dec
            if isinstance(target, ast.Name) and target.id == "register_model":
                named = [k.value.value for k in (call.keywords if call else []) if k.arg == "name"]
                names.append(named[0] if named else node.name)
    return sorted(names)


def check_model_name(cfg: Config) -> None:
    known = registered_model_names()
    if cfg.model.name not in known:
        close = difflib.get_close_matches(cfg.model.name, known, n=1)
        raise ConfigError(f"model.name={cfg.model.name}: unknown model"
                          + (f" (did you mean {close[0]!r}?)" if close else "") + f"; known models: {', '.join(known)}")


def resolve_run(recipe: str, data: Optional[str] = None, overrides: Sequence[str] = (),
                out: Optional[str] = None) -> Tuple[Config, str]:
    """``(config, run directory)`` of ``train/run.sh RECIPE [--data DATA] [--out RUN] [overrides]``, checked:
    the recipe, every override, the model name, the data directory, and the files the config names. Raises
    ConfigError."""
    cfg = load_config(recipe, overrides)
    if data:
        cfg.data.path = data
    run_dir = out or default_run_dir(recipe)
    check_model_name(cfg)
    check_data(cfg)
    resuming = os.path.isfile(os.path.join(run_dir, "last.pt"))  # then train.init_from is not read
    for key, value in (("model.pretrained", cfg.model.pretrained),
                       ("train.init_from", None if resuming else cfg.train.init_from)):
        if value and not os.path.isfile(value):
            raise ConfigError(f"{key}={value}: no such file")
    return cfg, run_dir


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``train/run.sh RECIPE [--data DATA] [--out RUN] [section.key=value ...]`` (read by
    ``train.config`` and ``train.launch``; ``resolve_run`` takes them)."""
    p.add_argument("recipe", help="a name in train/configs/ or a path to a YAML")
    p.add_argument("--data", help="repacked DATA directory (sets data.path)")
    p.add_argument("--out", help="run directory (default: runs/RECIPE)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def main(argv=None) -> int:
    """``python -m train.config RECIPE [--data DATA] [--out RUN] [section.key=value ...]``: check what
    ``train/run.sh`` would start with (run.sh does, before torchrun) and print the resolved config. A mistake
    is one line on stderr and exit status 2."""
    p = argparse.ArgumentParser(prog="python -m train.config", description=(
        "Check what train/run.sh would start with (the recipe, the overrides, the data directory) and print the "
        "resolved config. A mistake is one line on stderr and exit status 2."))
    add_run_args(p)
    p.add_argument("--quiet", action="store_true", help="print nothing when all is well")
    a = p.parse_intermixed_args(argv)
    try:
        cfg, _ = resolve_run(a.recipe, a.data, a.overrides, a.out)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if not a.quiet:
        print(dump_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
