"""What the user sees: the progress line, ``RUN/metrics.jsonl``, TensorBoard, and the curves PNG.

Only rank 0 makes a ``RunLog``; the other ranks get one with ``enabled=False`` that does nothing.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional

import torch

from dali_pipes.fileio import atomic_path, atomic_write_text, format_eta

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: Optional[int] = None,
                 rescale: Optional[float] = None, tb_dir: str = "tb"):
        """``resume_step``: the checkpoint's step, in its own units; ``rescale``: this run's steps per epoch
        over the checkpoint's, where they differ (the kept records' steps are converted)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS)
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step, rescale)
            if rescale is not None:
                resume_step = None  # a new TensorBoard directory (tb_dir): nothing in it to purge
            else:
                resume_step += 1  # the records up to the checkpoint's step stay
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in an existing folder (no last.pt): start the log over
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (pip install tensorboard)
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(run_dir, tb_dir), purge_step=resume_step)

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def record(self, kind: str, step: int, **values) -> None:
        """One line of metrics.jsonl (``kind`` train | val | event) and the numbers to TensorBoard."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def flush(self) -> None:
        """TensorBoard's queued events to disk (metrics.jsonl is flushed at every record)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_records(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill: the rest is still good
                    continue
    return out


def truncate_after(path: str, step: int, rescale: Optional[float] = None) -> None:
    """Drop the records past the checkpoint a run resumes from (``step``, in the records' units): the resumed
    run logs those steps again. ``rescale``: multiply the kept records' steps by it (the resumed run counts
    steps of another size: another process count or batch size), so the whole file has one unit."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_records(path) if r.get("step", 0) <= step]
    if rescale is not None:
        for r in keep:
            r["step"] = round(r["step"] * rescale)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---- the progress line --------------------------------------------------------------------------
def memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"gpu {torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return f"rss {rss / 2**20:.1f}G"


def progress_line(epoch: int, epochs: float, step_in_epoch: int, steps_per_epoch: int, loss: float, acc: float,
                  lr: float, images_per_s: float, data_wait: float, eta_s: float, memory: str,
                  extra: str = "") -> str:
    return (f"epoch {epoch}/{epochs:g} step {step_in_epoch}/{steps_per_epoch} loss {loss:.4f} acc {acc:.3f} "
            f"lr {lr:.2e} {images_per_s:.0f} img/s data {100 * data_wait:.0f}% eta {format_eta(eta_s)} "
            f"{memory}{extra}")


# ---- curves -------------------------------------------------------------------------------------
def plot_curves(run_dir: str) -> Optional[str]:
    """RUN/curves.png: train and val loss, val accuracy (image and product level), by epoch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no curves.png (pip install matplotlib)", file=sys.stderr)
        return None
    recs = read_records(os.path.join(run_dir, METRICS))
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        ax_acc.plot([r["epoch"] for r in train], [r["acc"] for r in train], label="train (image)", lw=1,
                    alpha=0.6)
    if val:
        ax_loss.plot([r["epoch"] for r in val], [r["loss"] for r in val], "o-", label="val")
        ax_acc.plot([r["epoch"] for r in val], [r["image_acc"] for r in val], "o-", label="val image")
        ax_acc.plot([r["epoch"] for r in val], [r["product_acc"] for r in val], "s-", label="val product")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, CURVES)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def summary(values: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
