"""The resume rules, in one place: what a resumed run may change, what only at an epoch end, what it refuses,
and how its steps are converted when the steps per epoch change.

``plan_resume`` takes plain data (the checkpoint's config, step, steps per epoch and process count, and this
run's config and process count) and returns a ``ResumePlan``, or raises a CheckpointError that names the key
and what to do. No model and no loader are needed, so the rules are tested on dicts.

* Read as the run goes (the lr schedule and warm-up, grad_clip, label smoothing, epochs, logging, early stop,
  data threads, ...): the new value applies.
* Held by the optimizer's param groups (``OPTIMIZER_KEYS``: lr multipliers, betas, eps, weight decay, fused):
  set on the restored optimizer (``optimizer_state``); its per-parameter state (Adam's moments and step
  counts) comes from the checkpoint. torch's ``load_state_dict`` alone would restore the saved values.
* ``train.amp``: a GradScaler that the checkpoint has none of (fp16 now, not before) starts at its initial
  scale (``scaler_state``).
* The reader position holds only for the process count, the data settings, the DATA records and the DALI graph
  it was taken with. The process count is checked here; the rest is the loader's own check of its state
  (``dali_pipes.loader``), whose refusal goes to ``ResumePlan.reader_mismatch``. Either is fine at an epoch
  end (the next epoch starts with fresh readers, and steps are converted to the new steps per epoch:
  ``ResumePlan.units``) and refused mid-epoch, where samples would be lost.
* Refused (``REFUSED_KEYS``): model.name, model.head, model.aux_levels, model.text_branch, model.text_dim: the
  weights are another model's.
* Not read when resuming (``IGNORED_KEYS``): model.pretrained, train.init_from: the checkpoint's weights win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

from .checkpoint import CheckpointError
from .config import Config, to_dict

OPTIMIZER_KEYS = ("optim.pretrained_lr_mult", "optim.new_lr_mult", "optim.betas", "optim.eps", "optim.weight_decay",
                  "optim.fused")
REFUSED_KEYS = ("model.name", "model.head", "model.aux_levels", "model.text_branch", "model.text_dim")
IGNORED_KEYS = ("model.pretrained", "train.init_from")


def flatten(values: dict, prefix: str = "") -> Dict[str, object]:
    """``{"optim": {"eps": 1e-8}}`` -> ``{"optim.eps": 1e-8}``."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> Dict[str, tuple]:
    """``{key: (old value, new value)}`` for every key whose value differs (None: the key is missing). A key
    that ``old`` lacks (a checkpoint of a version before the key) counts with its default, the value that
    keeps the older behaviour."""
    a, b = {**flatten(to_dict(Config())), **flatten(old)}, flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class Units(NamedTuple):
    """A resumed run's step counts in its own steps per epoch; ``scale`` is None where they did not change."""
    step: int
    best_step: int
    scale: Optional[float]
    tb_dir: str
    note: Optional[str]


@dataclass
class ResumePlan:
    path: str
    step: int  # the checkpoint's, in its own units
    steps_per_epoch: int  # the checkpoint's
    world_size: int  # the checkpoint's
    same_world: bool  # each rank's reader position and RNG states carry over
    changes: List[str] = field(default_factory=list)  # "key old -> new", for the start line
    notes: List[str] = field(default_factory=list)  # what the run does about them

    @property
    def mid_epoch(self) -> bool:
        return bool(self.step % self.steps_per_epoch)

    def loader_state(self, states: list, rank: int) -> Optional[dict]:
        """This rank's reader position, or None where the next epoch starts with fresh readers."""
        return states[rank] if self.same_world else None

    def reader_mismatch(self, detail: str) -> str:
        """The loader refused the saved reader position (``detail``: what differs): the note to print at an
        epoch end (the next epoch starts with fresh readers); mid-epoch a CheckpointError."""
        if self.mid_epoch:
            raise self._mid_epoch(detail)
        return f"the checkpoint's reader position does not fit this loader ({detail}); the next epoch starts " \
               "with fresh readers"

    def units(self, steps_per_epoch: int, best_step: int, tb_dir: str) -> Units:
        """The step and best step in ``steps_per_epoch`` units: the same epoch count where the steps per
        epoch changed (only at an epoch end: mid-epoch the reader positions refused it before). TensorBoard
        cannot rewrite its event files: the new units get a directory of their own."""
        old = self.steps_per_epoch
        if steps_per_epoch == old:
            return Units(self.step, best_step, None, tb_dir, None)
        if self.mid_epoch:
            raise self._mid_epoch(f"{old} -> {steps_per_epoch} steps per epoch")
        scale = steps_per_epoch / old
        step = self.step // old * steps_per_epoch
        best = round(best_step * scale) if best_step >= 0 else best_step
        tb_dir = f"tb_from_epoch{step // steps_per_epoch}_{steps_per_epoch}spe"
        note = (f"{old} -> {steps_per_epoch} steps per epoch: step {self.step} is step {step} now; metrics.jsonl "
                f"is rewritten in the new units, TensorBoard goes on in RUN/{tb_dir}")
        return Units(step, best, scale, tb_dir, note)

    def _mid_epoch(self, differs: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} stopped mid-epoch (step {self.step}); each process's reader position holds only for the "
            f"process count, data settings, DATA and code it was saved with, and this run differs: {differs}. "
            f"Finish the epoch with what the run started with (--nproc {self.world_size}, the same data.* "
            "settings), resume from an epoch-end checkpoint, or start a new run from these weights: --out NEW_RUN "
            f"train.init_from={self.path}")


def plan_resume(saved_config: dict, config: dict, *, step: int, steps_per_epoch: int, saved_world_size: int,
                world_size: int, path: str) -> ResumePlan:
    """The plan for resuming the checkpoint at ``path`` (its config, step, steps per epoch and process count)
    with ``config`` (``train.config.to_dict``) on ``world_size`` processes; a CheckpointError for what cannot
    resume."""
    if not isinstance(saved_config, dict):
        raise CheckpointError(f"{path}: its config is not a mapping; start a new run (another --out)")
    changed = config_changes(saved_config, config)
    refused = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k in REFUSED_KEYS]
    if refused:
        model = saved_config.get("model", {})
        raise CheckpointError(
            f"{path} holds model {model.get('name')} (head {model.get('head')}, aux_levels {model.get('aux_levels')}); "
            f"this run changes {', '.join(refused)}: a resumed run keeps the model its weights belong to. Use the "
            f"recipe the checkpoint was made with, or another --out for a new run (train.init_from={path} starts one "
            "from these weights)")
    plan = ResumePlan(path, int(step), int(steps_per_epoch), int(saved_world_size),
                      same_world=saved_world_size == world_size)
    for k, (a, b) in changed.items():
        why = (" (set on the restored optimizer)" if k in OPTIMIZER_KEYS else
               " (not read: the run resumes from its checkpoint's weights)" if k in IGNORED_KEYS else "")
        plan.changes.append(f"{k} {a!r} -> {b!r}{why}")
    if not plan.same_world:
        what = f"{saved_world_size} -> {world_size} processes"
        if plan.mid_epoch:
            raise plan._mid_epoch(what)
        plan.notes.append(f"{what}: the next epoch starts with fresh readers")
    return plan


def optimizer_state(saved: dict, fresh: dict, path: str) -> dict:
    """The optimizer state to load: the checkpoint's per-parameter state (``saved``) under this run's
    param-group settings (``fresh``: the state dict of the optimizer just built from this run's config).
    The param groups must be the same ones, with as many parameters each."""
    def shape(sd):
        return [(g.get("name"), len(g["params"])) for g in sd["param_groups"]]

    if shape(saved) != shape(fresh):
        raise CheckpointError(f"{path}: the optimizer's param groups (name, parameters) {shape(saved)} do not match "
                              f"this run's {shape(fresh)}; use the code and recipe the run started with, or another "
                              "--out for a new run")
    groups = [dict(new, params=old["params"]) for old, new in zip(saved["param_groups"], fresh["param_groups"])]
    return {"state": saved["state"], "param_groups": groups}


def scaler_state(saved: dict, fp16: bool) -> Optional[dict]:
    """The GradScaler state to load, or None where this run's scaler starts fresh: a run without fp16 saves
    an empty one, which an enabled scaler cannot load."""
    return None if fp16 and not saved else saved
