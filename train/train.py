"""The training entry: ``python -m train.train --config RECIPE [--data DATA] [--out RUN] [section.key=value ...]``.

Started by ``train/run.sh`` through torchrun (one process per GPU; on a machine without GPU, CPU processes
talking gloo), or directly as one process. Re-running the same command with an existing RUN/last.pt
resumes exactly where that checkpoint stopped, mid-epoch included.

Exit status: 0 done (or already done), 1 the loss went non-finite, 2 a config/data/checkpoint problem
(the message says which, a RUN that a live run holds included), 3 stopped early by the ``early_stop`` rule,
4 lost contact with the other processes of a distributed run (a node died, hung past ``train.dist_timeout_s``
or became unreachable), 5 stopped by SIGTERM or SIGUSR1 after writing RUN/last.pt (run the same command to
resume: a scheduler can requeue on it). Any other error exits 1 with its traceback.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dali_pipes.config import resolve_amp, resolve_backend
from dali_pipes.dataset import DatasetError, class_levels
from dali_pipes.loader import LoaderStateError, build_loader
from dali_pipes.ocr_files import OcrError
from dali_pipes.records import OCR_DIR
from dali_pipes.fileio import atomic_write_text
from models import AUX_HEADS, OPTIONAL_PREFIXES, TEXT_BRANCH, create_model, param_groups

from . import checkpoint, resume
from .config import Config, ConfigError, dump_yaml, resolve_run, to_dict
from .cpus import apply_cpu_share
from .distributed import (Dist, all_gather_object, all_reduce, barrier, catch_stop_signals, cleanup, lost_contact,
                          setup, stop_signal)
from .evaluate import evaluate
from .launch import (EXIT_EARLY_STOP, EXIT_ERROR, EXIT_LOST_CONTACT, EXIT_NONFINITE, EXIT_STOPPED, EXIT_USAGE,
                     STATUS_ENV, hold_run_lock)
from .metrics import RunLog, memory_text, plot_curves, progress_line, summary
from .schedule import StepSchedule

LAST, BEST = "last.pt", "best.pt"
_NO_STEP = 2**62  # "no bad step yet" in the device-side min-reduction


class NonFiniteLoss(RuntimeError):
    pass


class StepsDone(NamedTuple):
    """What ``Trainer.run_steps`` did: steps run, their wall time and the part spent waiting for batches."""
    steps: int
    seconds: float
    data_wait_s: float


def total_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` (``torch.nn.utils.get_total_norm`` where torch has it: 2.6 and later)."""
    fn = getattr(torch.nn.utils, "get_total_norm", None)
    if fn is not None:
        return fn(grads)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class Trainer:
    """One training run in one process (of ``d.world_size``).

    Public API (``fit`` and ``tools/bench.py`` use nothing else):

    * ``Trainer(cfg, run_dir, d)`` builds, in this order: the run directory (``_prepare_run_dir``), the
      checkpoint to resume from (``_read_checkpoint``), the data (``_build_data``), the model
      (``_build_model``), the optimizer and schedule (``_build_optimizer``), the resumed state
      (``_resume``), the DDP/compile wrapping (``_wrap_model``) and every rank's RNG streams.
    * ``run_steps(n, housekeeping=True) -> StepsDone``: up to ``n`` more training steps (never past
      ``total``), across epoch ends. With ``housekeeping`` the run's own schedule of progress lines,
      validations, checkpoints, the early-stop rule and the stop signals apply (``fit``); without, only the
      steps run (no log line, validation or checkpoint: ``tools.bench``). Returns the steps run, their wall time and the
      time spent waiting for batches. Device work may still be queued when it returns.
    * ``fit() -> exit status``: ``run_steps`` to the end, then the curves and the final line.
    * ``close()``. Read-only facts: ``step``, ``total``, ``spe`` (steps per epoch), ``num_classes``,
      ``category_ids``, ``stop_message`` (set when the early-stop rule ended the run), ``stopped_by``
      (SIGTERM or SIGUSR1 when a stop signal ended it, else 0).

    The loss of a batch is ``compute_loss(outputs, labels)``: the one place to add loss terms.
    The model gets the loader's images as they come (``prepare`` only moves them and sets the layout).
    """

    # With several processes the ranks ask each other for a caught stop signal every this many steps (a
    # host sync on the GPU); one process looks at every step.
    STOP_CHECK_EVERY = 10

    def __init__(self, cfg: Config, run_dir: str, d: Dist):
        self.cfg, self.run_dir, self.d = cfg, run_dir, d
        self.dev = d.device
        self.stop_message: Optional[str] = None
        self.stopped_by = 0  # the signal (SIGTERM, SIGUSR1) the run stopped on
        self._saved_step = -1
        self._run_lock = None
        self._check_combination()
        self._share_cpus()
        self._set_determinism()
        cfg.data.backend = resolve_backend(cfg.data.backend, note=self.note)
        cfg.train.amp = resolve_amp(cfg.train.amp, self.dev, note=self.note)  # RUN/config.yaml records it
        self._prepare_run_dir()
        self.ckpt, self.ckpt_path, self.plan = self._read_checkpoint()
        self._build_data()
        self._build_model()
        self._build_optimizer()
        self._resume()
        self._wrap_model()
        if d.is_main:  # written once the run could start: a failed start leaves no RUN/config.yaml
            atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
        # Every rank's own RNG streams: restored last, after everything above drew from them.
        tc, ck = cfg.train, self.ckpt
        random.seed(tc.seed + d.rank)
        np.random.seed(tc.seed + d.rank)
        torch.manual_seed(tc.seed + d.rank)
        if ck and self.plan.same_world:
            checkpoint.set_rng_state(ck["rng"][d.rank], self.dev)
        self.log = RunLog(run_dir, d.is_main, tc.tensorboard, resume_step=self._log_resume_step,
                          rescale=self._log_rescale, tb_dir=self.tb_dir)
        self._batches = None  # the current epoch's batch iterator (kept between run_steps calls)
        self._lr = None
        self._reset_interval()

    # ---- construction, in order ---------------------------------------------------------------------
    def note(self, msg: str) -> None:
        if self.d.is_main:
            print(f"note: {msg}", flush=True)

    def _check_combination(self) -> None:
        mc = self.cfg.model
        if mc.sync_bn and mc.compile and self.d.enabled:
            raise ConfigError("model.sync_bn=true with model.compile=true on several processes is refused: "
                              "torch.compile breaks its graph at every SyncBatchNorm under DDP (open upstream "
                              "problems), so the pair runs slower than either alone or fails. Set "
                              "model.compile=false or model.sync_bn=false")

    def _share_cpus(self) -> None:
        """This rank's own cores for its DALI and torch threads (``train.cpus``), before any of them start;
        ``train.num_threads``, where set, still decides torch's thread count (``_set_determinism``)."""
        dc, local_world = self.cfg.data, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        apply_cpu_share(dc.cpu_share, dc.cpu_reserve, self.d.local_rank, local_world,
                        torch_threads=not self.cfg.train.num_threads, note=self.note)

    def _set_determinism(self) -> None:
        tc = self.cfg.train
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        torch.use_deterministic_algorithms(tc.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not tc.deterministic
        torch.backends.cudnn.deterministic = tc.deterministic
        if self.dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = not tc.deterministic
            torch.backends.cudnn.allow_tf32 = not tc.deterministic

    def _prepare_run_dir(self) -> None:
        if self.d.is_main:
            # One run per RUN: train/run.sh took RUN/.lock before torchrun started (then this is a no-op);
            # started otherwise, rank 0 takes it here, before anything in RUN is touched.
            self._run_lock = hold_run_lock(self.run_dir, note=self.note)
            stale = checkpoint.remove_stale_temps(self.run_dir)
            if stale:
                self.note(f"removed {len(stale)} unfinished checkpoint write(s): {', '.join(stale)}")
        barrier(self.d)

    def _read_checkpoint(self):
        """(checkpoint or None, its path, its ``resume.ResumePlan`` or None). Every rank reads it: RUN is
        shared storage."""
        path = os.path.join(self.run_dir, LAST)
        seen = all_gather_object(os.path.exists(path), self.d)
        if len(set(seen)) > 1:
            raise checkpoint.CheckpointError(f"{path} exists on some nodes only ({seen}); RUN must be on storage "
                                             "that every node sees")
        if not seen[0]:
            return None, path, None
        ck = checkpoint.load(path)
        plan = resume.plan_resume(ck["config"], to_dict(self.cfg), step=ck["step"], path=path,
                                  steps_per_epoch=ck["steps_per_epoch"], saved_world_size=ck["world_size"],
                                  world_size=self.d.world_size)
        for msg in plan.notes:
            self.note(msg)
        return ck, path, plan

    def _build_data(self) -> None:
        """Loaders; each rank resumes its own reader position (``resume``: where it fits)."""
        cfg, d, ck = self.cfg, self.d, self.ckpt
        state = self.plan.loader_state(ck["loader_states"], d.rank) if ck else None
        class_map = ck["category_ids"] if ck else None
        text = cfg.model.text_branch
        try:
            self.train_loader, self.spe = build_loader(cfg.data, d.rank, d.world_size, "train", device=self.dev,
                                                       state=state, class_map=class_map, text=text)
        except LoaderStateError as e:
            self.note(self.plan.reader_mismatch(e.detail))  # mid-epoch: refused
            self.train_loader, self.spe = build_loader(cfg.data, d.rank, d.world_size, "train", device=self.dev,
                                                       class_map=class_map, text=text)
        self.category_ids = list(self.train_loader.category_ids)
        self.num_classes = self.train_loader.num_classes
        self.level_maps = self._level_maps()
        self.text_hashing = self.train_loader.text_hashing
        if text:
            ocr_dir = os.path.join(cfg.data.path, OCR_DIR)
            self.note(f"text branch: the words tools.ocr read, from {ocr_dir}")
            if ck:
                checkpoint.check_text(ck.get("text_hashing"), self.ckpt_path, self.text_hashing, ocr_dir)
        if ck:
            checkpoint.check_classes(ck, self.ckpt_path, self.category_ids)
        try:
            self.val_loader, _ = build_loader(cfg.data, d.rank, d.world_size, "val", device=self.dev,
                                              class_map=self.category_ids, text=text)
        except OcrError:  # the val pictures' words cannot be read: not a reason to train without validation
            raise
        except DatasetError as e:
            self.val_loader = None
            self.note(f"no validation: {e}")

    def _build_model(self) -> None:
        """The same initial weights on every rank (DDP broadcasts rank 0's anyway)."""
        cfg, d, ck, tc, mc = self.cfg, self.d, self.ckpt, self.cfg.train, self.cfg.model
        torch.manual_seed(tc.seed)
        # ImageNet weights only for a new run: resuming or init_from overwrite every tensor anyway
        pretrained = None if ck or tc.init_from else mc.pretrained
        aux = {name: n for name, (n, _) in self.level_maps.items()} or None
        text = {"buckets": int(self.text_hashing["buckets"]), "dim": mc.text_dim} if mc.text_branch else None
        raw = create_model(mc.name, self.num_classes, head=mc.head, pretrained=pretrained, aux_classes=aux,
                           text_branch=text)
        if ck:
            checkpoint.check_model(ck, self.ckpt_path, mc.name, mc.head, raw)
            raw.load_state_dict(ck["model"])
            checkpoint.apply_input_norm(ck, raw)
        elif tc.init_from:
            self._init_from(raw, tc.init_from)
        if mc.sync_bn and d.enabled:
            if self.dev.type == "cuda":
                raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
            else:  # torch's SyncBatchNorm runs on GPUs only
                self.note("model.sync_bn needs GPUs: per-process BatchNorm on the CPU")
        raw.to(self.dev)
        if mc.channels_last:
            raw.to(memory_format=torch.channels_last)
        self.raw = raw

    def _build_optimizer(self) -> None:
        oc, tc = self.cfg.optim, self.cfg.train
        groups = param_groups(self.raw)
        opt_groups = [{"params": groups[name], "lr_mult": mult, "name": name}
                      for name, mult in (("pretrained", oc.pretrained_lr_mult), ("new", oc.new_lr_mult))
                      if groups[name]]
        self.params = [p for g in opt_groups for p in g["params"]]
        self.opt = torch.optim.Adam(opt_groups, lr=oc.lr_schedule[0][1], betas=tuple(oc.betas), eps=oc.eps,
                                    weight_decay=oc.weight_decay, fused=oc.fused or None)
        self.fp16 = tc.amp == "fp16"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=self.fp16)
        self.schedule = StepSchedule(oc.lr_schedule, self.spe, oc.warmup_epochs, oc.warmup_start)
        self.total = self.schedule.total_steps(tc.epochs)
        if tc.max_steps:
            self.total = min(self.total, tc.max_steps)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=oc.label_smoothing)

    def _resume(self) -> None:
        """Optimizer, scaler, step and best from the checkpoint, as ``resume`` rules: the optimizer takes
        this run's param-group settings, and steps count this run's batches (the checkpoint's step, its
        best step and the earlier metrics.jsonl records converted where the steps per epoch changed)."""
        ck = self.ckpt
        self.step = 0
        self.best = {"metric": -1.0, "step": -1}
        self._log_resume_step, self._log_rescale, self.tb_dir = None, None, "tb"
        if not ck:
            return
        self.opt.load_state_dict(resume.optimizer_state(ck["optimizer"], self.opt.state_dict(), self.ckpt_path))
        scaler = resume.scaler_state(ck["scaler"], self.fp16)
        if scaler is not None:
            self.scaler.load_state_dict(scaler)
        self._log_resume_step = int(ck["step"])  # in the checkpoint's units
        self.best = dict(ck["best"])
        units = self.plan.units(self.spe, self.best["step"], ck.get("tb_dir", "tb"))
        self.step, self.best["step"], self._log_rescale, self.tb_dir = units.step, units.best_step, units.scale, \
            units.tb_dir
        if units.note:
            self.note(units.note)

    def _wrap_model(self) -> None:
        d = self.d
        model = (DDP(self.raw, device_ids=[self.dev.index] if self.dev.type == "cuda" else None,
                     gradient_as_bucket_view=True) if d.enabled else self.raw)
        mc = self.cfg.model
        self.model = torch.compile(model, mode=mc.compile_mode) if mc.compile else model
        self._compile_pending = bool(self.cfg.model.compile)  # compiled lazily, on the first step
        # CUDA graphs replay into the same output memory: each step tells them that a new step begins, so the
        # previous step's outputs (already summed into the statistics) may be overwritten
        self._cudagraphs = bool(mc.compile) and mc.compile_mode == "reduce-overhead"

    def _level_maps(self) -> Dict[str, tuple]:
        """``{"level1": (level classes, class -> level class on the device), ...}`` for model.aux_levels."""
        levels = self.cfg.model.aux_levels
        if levels and self.cfg.data.backend == "synthetic":
            raise ConfigError("model.aux_levels needs a data directory with classes.csv (not data.backend=synthetic)")
        out = {}
        for level in levels:
            names, index = class_levels(self.cfg.data.path, level)
            out[f"level{level}"] = (len(names), torch.tensor(index, dtype=torch.long, device=self.dev))
        return out

    def _init_from(self, raw: torch.nn.Module, path: str) -> None:
        """The checkpoint's weights; hierarchy heads only where this model has the same ones (a head the
        checkpoint lacks starts fresh, one this model lacks is left out)."""
        src = checkpoint.load(path)
        checkpoint.check_classes(src, path, self.category_ids)
        checkpoint.check_model(src, path, self.cfg.model.name, self.cfg.model.head, raw, ignore_aux=True)
        ours = raw.state_dict()
        if self.cfg.model.text_branch:  # a branch trained on other hashed ids would read other words
            checkpoint.check_text(src.get("text_hashing"), path, self.text_hashing,
                                  os.path.join(self.cfg.data.path, OCR_DIR))
        weights = {k: v for k, v in src["model"].items()
                   if not k.startswith(OPTIONAL_PREFIXES) or (k in ours and ours[k].shape == v.shape)}
        fresh = sorted({k.split(".")[1] for k in ours if k.startswith(AUX_HEADS + ".") and k not in weights})
        raw.load_state_dict(weights, strict=False)
        checkpoint.apply_input_norm(src, raw)  # the weights go on seeing pictures normalized as they were
        if fresh:
            self.note(f"init_from {path}: no trained hierarchy head for {', '.join(fresh)}: it starts fresh")
        theirs = any(k.startswith(TEXT_BRANCH + ".") for k in src["model"])
        if self.cfg.model.text_branch and not any(k.startswith(TEXT_BRANCH + ".") for k in weights):
            self.note(f"init_from {path}: {'its text branch has other shapes' if theirs else 'no text branch'}: "
                      "the text branch starts fresh (adding nothing to the outputs at first)")
        elif theirs and not self.cfg.model.text_branch:
            self.note(f"init_from {path}: its text branch is left out (model.text_branch is false)")
        self.note(f"init_from {path}: model weights of step {src['step']} (its best product acc "
                  f"{src['best']['metric']:.4f})")

    # ---- the step -----------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def prepare(self, images: torch.Tensor, labels: torch.Tensor):
        """The batch on the device. Images stay the loader's uint8 (N, H, W, 3): the model normalizes them
        and sets the layout itself (``models.heads.Net.prepare_input``, inside the compiled graph)."""
        images = images.to(self.dev, non_blocking=True)
        return images, labels.to(self.dev, non_blocking=True).view(-1).long()

    def _reset_interval(self) -> None:
        z = torch.zeros((), device=self.dev)
        self.acc_loss, self.acc_correct, self.acc_skipped = z.clone(), z.clone(), z.clone()
        self.bad_step = torch.full((), _NO_STEP, dtype=torch.long, device=self.dev)
        self.dev_step = torch.full((), self.step, dtype=torch.long, device=self.dev)
        self.int_steps, self.int_wait, self.int_start = 0, 0.0, time.perf_counter()

    def compute_loss(self, outputs, labels: torch.Tensor):
        """``(loss, logits)`` of one batch: the training objective, and the class logits that the
        accuracy counts. Extra loss terms (more heads) go here: each hierarchy head's cross-entropy against
        the level class of the label, weighted by optim.aux_weight."""
        if not self.level_maps:
            return self.criterion(outputs, labels), outputs
        logits, aux = outputs
        loss = self.criterion(logits, labels)
        w = self.cfg.optim.aux_weight
        for head_logits, (_, index) in zip(aux, self.level_maps.values()):
            loss = loss + w * self.criterion(head_logits, index[labels])
        return loss, logits

    def _first_compiled_step(self, images: torch.Tensor, labels: torch.Tensor, text=None) -> None:
        """torch.compile traces and compiles the model (forward, input normalization included, and backward)
        on its first call: say so, and how long that step took."""
        self._compile_pending = False
        self.log.print(f"compiling {self.cfg.model.name} with torch.compile (inductor) on the first step ...")
        t0 = time.perf_counter()
        self.train_step(images, labels, text)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.log.print(f"compiled: the first step took {time.perf_counter() - t0:.1f} s, compilation included")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, text=None) -> None:
        """One step; ``text``: the batch's OCR input ``(ids, offsets)`` for a model with a text branch."""
        if self._compile_pending:
            return self._first_compiled_step(images, labels, text)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        kw = {} if text is None else {"text": text}
        with self.autocast():
            outputs = self.model(images, aux=True, **kw) if self.level_maps else self.model(images, **kw)
            loss, logits = self.compute_loss(outputs, labels)
        self.scaler.scale(loss).backward()
        clip = self.cfg.optim.grad_clip
        if clip or self.fp16:
            self.scaler.unscale_(self.opt)
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip else total_norm(grads)
            if self.fp16:  # the scaler skips this step: count it (no host sync)
                self.acc_skipped += ~torch.isfinite(norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        # Statistics stay on the device; they are read at the log interval only.
        loss = loss.detach().float()
        self.dev_step += 1
        self.acc_loss += loss
        self.acc_correct += (logits.detach().argmax(1) == labels).sum()
        if not self.fp16:
            self.bad_step = torch.where(torch.isfinite(loss), self.bad_step, torch.minimum(self.bad_step, self.dev_step))

    # ---- logging, validation, checkpoints -------------------------------------------------------------
    def flush(self) -> None:
        """End a log interval: the one host sync of the loop; stops the run on a non-finite loss."""
        n = self.int_steps
        if n == 0:
            return
        bad_step = int(all_reduce(self.bad_step.clone(), self.d, "min"))
        sums = all_reduce(torch.stack([self.acc_loss, self.acc_correct, self.acc_skipped]), self.d)
        loss_sum, correct, skipped = sums.tolist()
        elapsed = time.perf_counter() - self.int_start
        if bad_step != _NO_STEP:
            self.log.record("event", bad_step, event="nonfinite_loss")
            raise NonFiniteLoss(f"the loss is not finite at step {bad_step} (epoch {bad_step / self.spe:.2f}); the run "
                                f"stops; {LAST}, if any, is from before it. Try a lower lr (optim.lr_schedule), "
                                "optim.grad_clip, or train.amp=fp16/off")
        if self.fp16 and skipped >= n * self.d.world_size:
            raise NonFiniteLoss(f"fp16: all {n} steps up to step {self.step} had non-finite gradients and were "
                                "skipped; the run stops. Try train.amp=bf16 or a lower lr")
        w, bs = self.d.world_size, self.cfg.data.batch_size
        rec = {"epoch": round(self.step / self.spe, 4), "loss": loss_sum / (n * w), "acc": correct / (n * w * bs),
               "lr": self.schedule.lr_at(self.step - 1), "images_per_s": n * w * bs / elapsed,
               "data_wait": self.int_wait / elapsed}
        if self.fp16:
            rec["skipped"] = int(skipped / w)
        self.log.record("train", self.step, **rec)
        epoch, in_epoch = (self.step - 1) // self.spe + 1, (self.step - 1) % self.spe + 1
        eta = (self.total - self.step) * elapsed / n
        extra = f" skipped {rec['skipped']}" if self.fp16 and rec["skipped"] else ""
        self.log.print(progress_line(epoch, self.cfg.train.epochs, in_epoch, self.spe, rec["loss"], rec["acc"],
                                     rec["lr"], rec["images_per_s"], rec["data_wait"], eta, memory_text(self.dev),
                                     extra))
        self._reset_interval()

    def validate(self) -> Optional[Dict[str, float]]:
        if self.val_loader is None:
            return None
        t = time.perf_counter()
        m = evaluate(self.raw, self.val_loader, self.d, self.num_classes, self.autocast, self.prepare,
                     self.level_maps)
        m["epoch"] = round(self.step / self.spe, 4)
        m["seconds"] = round(time.perf_counter() - t, 2)
        self.log.record("val", self.step, **m)
        self.log.print(f"val step {self.step}: " + summary(m))
        return m

    def save(self, status: str, new_best: bool = False) -> None:
        """RUN/last.pt (and best.pt): gathered from every rank, written by rank 0."""
        parts = all_gather_object({"loader": self.train_loader.state(), "rng": checkpoint.rng_state(self.dev)},
                                  self.d)
        if self.d.is_main:
            ckpt = {
                "format": checkpoint.FORMAT, "status": status, "step": self.step, "steps_per_epoch": self.spe,
                "world_size": self.d.world_size, "model": self.raw.state_dict(), "model_name": self.cfg.model.name,
                "num_classes": self.num_classes, "category_ids": self.category_ids,
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "config": to_dict(self.cfg), "best": dict(self.best),
                "loader_states": [p["loader"] for p in parts], "rng": [p["rng"] for p in parts],
                "tb_dir": self.tb_dir, "input_norm": self.raw.input_norm(),
                # how the text branch's word ids were made and read (None without a branch)
                "text_hashing": self.text_hashing, "text_ocr": self.train_loader.text_settings,
            }
            last = os.path.join(self.run_dir, LAST)
            self.log.flush()  # the event files hold every step the checkpoint holds (a resume purges the rest)
            checkpoint.save(ckpt, last)
            if new_best:
                checkpoint.copy(last, os.path.join(self.run_dir, BEST))
        self._saved_step = self.step

    def _early_stop(self, m: Dict[str, float]) -> Optional[str]:
        es = self.cfg.early_stop
        pos = self.step / self.spe
        if es.after_epoch is None or pos < es.after_epoch or m[es.metric] >= es.min_val_acc:
            return None
        return (f"early stop: val {es.metric} {m[es.metric]:.4f} < {es.min_val_acc} at epoch {pos:.2f} "
                f"(rule early_stop.after_epoch={es.after_epoch:g}, min_val_acc={es.min_val_acc}); this run is not "
                "going anywhere. To go on anyway, run again with early_stop.after_epoch=null")

    def _housekeeping(self) -> None:
        """After a step: the progress line, validation, checkpoints and the early-stop rule, as configured."""
        tc = self.cfg.train
        epoch_end, done = self.step % self.spe == 0, self.step >= self.total
        do_val = epoch_end or done or (tc.val_every_steps and self.step % tc.val_every_steps == 0)
        do_save = do_val or (tc.ckpt_every_steps and self.step % tc.ckpt_every_steps == 0)
        if do_save or self.step % tc.log_every == 0:
            self.flush()
        if do_val:
            m = self.validate()
            new_best = m is not None and m["product_acc"] > self.best["metric"]
            if new_best:
                self.best = {"metric": m["product_acc"], "step": self.step}
            self.stop_message = self._early_stop(m) if m else None
            status = "early_stopped" if self.stop_message else "finished" if done else "running"
            self.save(status, new_best or (m is None and done))
        elif do_save:
            self.save("running")
        if do_save:
            self._reset_interval()

    # ---- the loop -----------------------------------------------------------------------------------
    def run_steps(self, n: int, housekeeping: bool = True) -> StepsDone:
        """Up to ``n`` more steps (never past ``total``; fewer when the early-stop rule ends the run)."""
        done, wait, t_start = 0, 0.0, time.perf_counter()
        while done < n and self.step < self.total and self.stop_message is None:
            if housekeeping and self._stop_on_signal():
                break
            if self._batches is None:
                self._batches = iter(self.train_loader)
            t0 = time.perf_counter()
            try:
                images, labels, *text = next(self._batches)  # text: with model.text_branch
            except StopIteration:
                raise RuntimeError(f"the train loader ended after step {self.step}, before the end of its epoch "
                                   f"({self.spe} steps); a loader bug") from None
            dt = time.perf_counter() - t0
            wait += dt
            self.int_wait += dt
            lr = self.schedule.lr_at(self.step)
            if lr != self._lr:
                self._lr = lr
                for g in self.opt.param_groups:
                    g["lr"] = lr * g["lr_mult"]
            self.train_step(*self.prepare(images, labels), *text)
            self.step += 1
            self.int_steps += 1
            done += 1
            if self.step % self.spe == 0:
                self._batches = None  # the loader has moved to the next epoch
            if housekeeping:
                self._housekeeping()
        return StepsDone(done, time.perf_counter() - t_start, wait)

    def _stop_on_signal(self) -> bool:
        """At a step boundary that every rank checks: when a rank has caught SIGTERM or SIGUSR1, every rank
        stops here and rank 0 writes RUN/last.pt at this step (a signal during a validation waits for its
        end)."""
        if self.d.enabled and self.step % self.STOP_CHECK_EVERY:
            return False
        self.stopped_by = stop_signal(self.d)
        if not self.stopped_by:
            return False
        if self._saved_step != self.step:
            self.flush()
            self.save("running")
            self._reset_interval()
        self.log.record("event", self.step, event="stopped", signal=signal.Signals(self.stopped_by).name)
        return True

    def fit(self) -> int:
        cfg, d = self.cfg, self.d
        ck = self.ckpt
        if ck and ck["status"] == "early_stopped" and cfg.early_stop.after_epoch is not None:
            self.log.print(f"{self.run_dir} was stopped early at step {ck['step']} by the early_stop rule; to go on "
                           "anyway, run again with early_stop.after_epoch=null")
            return EXIT_EARLY_STOP
        if self.step >= self.total:
            self.log.print(f"{self.run_dir} is already done: step {self.step} of {self.total}; nothing to do "
                           "(raise train.epochs to train longer)")
            return 0
        self.log.print(self._start_line())
        self.run_steps(self.total - self.step)
        if d.is_main:
            plot_curves(self.run_dir)
        if self.stopped_by:
            self.log.print(f"stopped by {signal.Signals(self.stopped_by).name} at step {self.step} (epoch "
                           f"{self.step / self.spe:.2f}): {os.path.join(self.run_dir, LAST)} holds it; run the same "
                           "command to resume")
            return EXIT_STOPPED
        if self.stop_message:
            self.log.record("event", self.step, event="early_stop", message=self.stop_message)
            self.log.print(self.stop_message)
            return EXIT_EARLY_STOP
        best = self.best
        self.log.print(f"done: {self.step} steps; best val product acc {best['metric']:.4f} at step {best['step']}; "
                       f"{os.path.join(self.run_dir, LAST)}, {os.path.join(self.run_dir, BEST)}")
        return 0

    def _start_line(self) -> str:
        """What the run starts with: the batch (per process and global), the lr at this step and the group
        multipliers that are not 1, amp, and on a resume every config key that differs from the checkpoint."""
        cfg, d = self.cfg, self.d
        what = f"resuming at step {self.step}" if self.ckpt else "new run"
        mults = "".join(f" x{g['lr_mult']:g} {g['name']}" for g in self.opt.param_groups if g["lr_mult"] != 1)
        changed = f"; changed since {LAST}: {'; '.join(self.plan.changes)}" if self.plan and self.plan.changes else ""
        return (f"{what}: {cfg.model.name} ({self.num_classes} classes) in {self.run_dir}; {d.world_size} process(es) "
                f"on {self.dev.type} ({cfg.data.backend}), batch {cfg.data.batch_size}x{d.world_size} (global "
                f"{cfg.data.batch_size * d.world_size}), lr {self.schedule.lr_at(self.step):.2e}{mults}, "
                f"{self.spe} steps/epoch, {self.total} steps ({self.total / self.spe:g} epochs), amp {cfg.train.amp}"
                f"{changed}")

    def close(self) -> None:
        self.log.close()
        if self._run_lock is not None:
            os.close(self._run_lock)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe: a name in train/configs/ (resnet50, demo, ...) or a path")
    p.add_argument("--data", help="repacked DATA directory (sets data.path)")
    p.add_argument("--out", help="run directory RUN (default: runs/RECIPE); an existing RUN/last.pt is resumed")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=2 data.batch_size=32")
    return p.parse_args(argv)


def main(argv=None) -> int:
    catch_stop_signals()  # from the start: a signal during the set-up stops the run at its first step
    args = parse_args(argv)
    d = None
    trainer = None
    code = None
    try:
        cfg, run_dir = resolve_run(args.config, args.data, args.overrides, args.out)
        if cfg.train.deterministic:  # cuBLAS reads this when CUDA starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        d = setup(cfg.train.dist_timeout_s)
        if not d.is_main:  # non-zero ranks stay quiet, library prints included; errors still go to stderr
            sys.stdout = open(os.devnull, "w")
        trainer = Trainer(cfg, run_dir, d)
        code = trainer.fit()
    except (ValueError, DatasetError, checkpoint.CheckpointError) as e:  # ConfigError is a ValueError
        if trainer is not None:  # past setup a ValueError is a bug: show where
            report_status(EXIT_ERROR)
            raise
        if d is None or d.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except NonFiniteLoss as e:
        if d.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except RuntimeError as e:  # a collective that failed: another node died, hung or went away
        msg = lost_contact(e, d) if d is not None else None
        if msg is None:
            report_status(EXIT_ERROR)
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)  # every rank: each says what it saw
        code = EXIT_LOST_CONTACT
    except Exception:
        report_status(EXIT_ERROR)  # first: the other ranks lose contact (4) because of this error
        raise
    finally:
        # The status first: once one process of the run exits, torchrun ends the others, teardown or not.
        if code:
            report_status(code)
        if trainer is not None:
            trainer.close()
        cleanup()
    return code


def report_status(code: int) -> None:
    """Under run.sh (TRAIN_STATUS_FILE set) the status goes to that file, for run.sh to return: torchrun
    turns every failure into 1. Every process writes it (atomically), as soon as it knows it, so the status
    is there whichever process torchrun sees end first. The first status stays: an error on one rank makes
    the others lose contact (4) after it."""
    path = os.environ.get(STATUS_ENV)
    if not path or not code:
        return
    try:
        with open(path) as f:
            if f.read().strip():
                return
    except FileNotFoundError:
        pass
    atomic_write_text(path, str(code))


def _exit_status(code: int) -> int:
    """The process's exit status: under run.sh an early stop or a stop on a signal exits 0, so that torchrun
    does not report a failure (run.sh returns 3 or 5 from the status file)."""
    if os.environ.get(STATUS_ENV) and code in (EXIT_EARLY_STOP, EXIT_STOPPED):
        return 0
    return code


if __name__ == "__main__":
    sys.exit(_exit_status(main()))
