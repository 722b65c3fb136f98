"""Throughput benchmarks: one tool, one code path per stage, numbers as ratios.

    python -m tools.bench loader   --data DATA [--backend dali-gpu|dali-cpu] [--batch B] [--threads T]
    python -m tools.bench baseline --data DATA [--batch B] [--threads T]
    python -m tools.bench train    --model resnet50 [--data DATA] [--synthetic] [--amp bf16|fp16|off] ...
    python -m tools.bench tune     --data DATA [--recipe resnet50] [--model M] [--batches 256 384 512] [--modes ...]
    python -m tools.bench predict  --data DATA_TEST|--bson test.bson --checkpoint RUN/best.pt [--tta flip]
    python -m tools.bench repack   --bson train.bson --categories category_names.csv [--workers 1 2]
    python -m tools.bench scale    --step repack --point 10000 "python -m tools.repack ..." --point 40000 ...
    python -m tools.bench order    --data DATA [--world-size W] [--shuffle epoch|buffer] [--batch 256]

Every figure is printed as a table and, with ``--json FILE``, written with the environment so runs on
different machines can be compared. Timings are taken after a warm-up, between device synchronizations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from dali_pipes.config import SHUFFLES, DataConfig
from dali_pipes.fileio import interruptible


# ---- environment and output ----------------------------------------------------------------------
def environment(batch: Optional[int] = None, threads: Optional[int] = None) -> dict:
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "batch": batch, "threads": threads}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()  # intra-op threads: they share the cores with DALI's
        env["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        env["torch"] = None
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:  # pragma: no cover
        env["dali"] = None
    return env


def _flatten(d: dict, prefix: str = "") -> List[tuple]:
    rows = []
    for k, v in d.items():
        if k == "env":
            continue
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((prefix + k, v))
    return rows


def report(result: dict, json_path: Optional[str]) -> dict:
    rows = _flatten(result)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        print(f"  {k:<{width}}  {v}")
    env = result.get("env", {})
    print("  env: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    if json_path:
        from dali_pipes.fileio import atomic_write_text

        atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    return result


def percentiles_ms(times: List[float]) -> Dict[str, float]:
    a = np.asarray(times) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def timed_loop(step: Callable[[], int], warmup: int, seconds: float, max_steps: Optional[int] = None,
               sync: Callable[[], None] = lambda: None, cpu: Optional[dict] = None):
    """Run ``step`` (returns images done) ``warmup`` times, then for ``seconds`` (or ``max_steps``);
    return (images/s, per-step times). ``cpu`` (a dict) receives ``us_per_image``: this process's user +
    system time (every thread: DALI's workers too) over the timed steps, per image."""
    for _ in range(warmup):
        step()
    sync()
    times, images = [], 0
    c0 = _cpu_seconds()
    t0 = last = time.perf_counter()
    while True:
        images += step()
        sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if (max_steps and len(times) >= max_steps) or (not max_steps and now - t0 >= seconds):
            break
    if cpu is not None:
        cpu["us_per_image"] = (_cpu_seconds() - c0) * 1e6 / images
    return images / (last - t0), times


def _endless(iterable):
    """Batches across epoch ends: each ``for`` over a loader is one epoch."""
    while True:
        yield from iterable


def _jpegs(data: str, limit: int) -> List[bytes]:
    """Up to ``limit`` JPEGs of the train split, read straight from the shards."""
    from dali_pipes.dataset import open_dataset
    from dali_pipes.records import read_examples

    ds = open_dataset(data)
    split = "train" if "train" in ds.manifest["splits"] else next(iter(ds.manifest["splits"]))
    out: List[bytes] = []
    for path in ds.shards(split)[0]:
        for r in read_examples(path):
            out.append(r["image"])
            if len(out) >= limit:
                return out
    return out


# ---- repack ----------------------------------------------------------------------------------------
def bench_repack(a) -> dict:
    import bson

    from dali_pipes.writer.repack import repack

    size = os.path.getsize(a.bson)

    def bare_scan() -> float:
        t0 = time.perf_counter()
        n = 0
        with open(a.bson, "rb") as f:
            for doc in bson.decode_file_iter(f):
                for img in doc["imgs"]:
                    n += len(img["picture"])
        return time.perf_counter() - t0

    bare_scan()  # warm the page cache: both sides then read from memory
    scan_s = min(bare_scan() for _ in range(2))
    res = {"mode": "repack", "bson_mb": size / 1e6, "bare_scan": {"mb_per_s": size / 1e6 / scan_s}}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for verify in a.verify:
            for w in a.workers:
                t0, c0 = time.perf_counter(), _cpu_seconds()
                m = repack(a.bson, os.path.join(tmp, f"w{w}"), categories=a.categories, workers=w,
                           shard_size_mb=a.shard_size_mb, verify=verify, overwrite=True, progress=False)
                dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                mbs = size / 1e6 / dt
                key = f"workers_{w}" if len(a.verify) == 1 else f"{verify}_workers_{w}"
                res[key] = {"verify": verify, "mb_per_s": mbs, "products_per_s": m["counts"]["products_read"] / dt,
                            "images_per_s": m["counts"]["images_read"] / dt,
                            "per_core_over_bare_scan": mbs / w / res["bare_scan"]["mb_per_s"],
                            # CPU seconds of this process and its workers: per-worker speed on a busy machine
                            "cpu_s": cpu, "mb_per_cpu_s": size / 1e6 / cpu,
                            "images_per_cpu_s": m["counts"]["images_read"] / cpu}
    res["env"] = environment(threads=max(a.workers))
    return res


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (the repack's pool)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---- scale: one command's cost at several catalogue sizes -----------------------------------------
def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # gone meanwhile
        pass
    return out


def _proc_sample(pid: int) -> Optional[tuple]:
    """(peak RSS bytes so far, CPU seconds, command name, private bytes now, anonymous bytes now) of a live
    process; None once it is gone. Private: the pages no other process maps (what a forked worker adds; its
    RSS also counts the pages it shares with its parent). Anonymous: RSS less the pages of mapped files
    (DALI maps the shards it reads: those pages are reclaimable page cache, counted in RSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = {k: v for k, _, v in (line.partition(":") for line in f)}
        hwm = int(status.get("VmHWM", "0 kB").split()[0]) * 1024
        anon = int(status.get("RssAnon", "0 kB").split()[0]) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            private = sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_"))
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return hwm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), cmd, private, anon


# Runs the measured command as its child and writes the child's wait4 figures: a process started by fork
# reports at least the RSS of the process that forked it, so the fork must come from this small one, not from
# the bench (torch is imported there).
_RUNNER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} {os.waitstatus_to_exitcode(status)}")
"""


def measure_command(argv: List[str], interval: float = 0.1, log: Optional[str] = None) -> dict:
    """Run ``argv``: wall seconds, CPU seconds of it and of every process it starts (user + system, from
    ``wait4``), the peak RSS of the whole tree (exact) and of its own process and of each process it starts
    (their ``VmHWM``, sampled every ``interval`` seconds)."""
    import subprocess

    with tempfile.NamedTemporaryFile("r", suffix=".rusage") as ru_file:
        out = open(log, "w") if log else subprocess.DEVNULL
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", _RUNNER, ru_file.name, *argv], stdout=out,
                             stderr=subprocess.STDOUT if log else None)
        seen: Dict[int, tuple] = {}
        root_pid = None
        while p.poll() is None:
            kids = _children(p.pid)
            root_pid = kids[0] if kids else root_pid
            todo = list(kids)
            while todo:
                q = todo.pop()
                todo += _children(q)
                s, was = _proc_sample(q), seen.get(q, (0, 0.0, "", 0, 0))
                if s is not None and s[2]:  # an exited process (a zombie) keeps its last live sample
                    seen[q] = (max(s[0], was[0]), s[1], s[2], max(s[3], was[3]), max(s[4], was[4]))
            time.sleep(interval)
        wall = time.perf_counter() - t0
        if log:
            out.close()
        fields = ru_file.read().split()
    if p.returncode or len(fields) != 3 or int(fields[2]):
        raise ValueError(f"{' '.join(argv)} failed (exit status {fields[2] if len(fields) == 3 else p.returncode})"
                         + (f"; see {log}" if log else ""))
    tree, cpu = int(fields[0]) / 1024, float(fields[1])
    root_sample = seen.pop(root_pid, (0, 0.0, "", 0, 0))
    root = root_sample[0] / 2**20
    procs = sorted(({"pid": q, "peak_rss_mb": v[0] / 2**20, "peak_private_mb": v[3] / 2**20, "cpu_s": v[1],
                     "cmd": v[2][:120]} for q, v in seen.items()), key=lambda d: -d["peak_rss_mb"])
    child = max([d["peak_rss_mb"] for d in procs] or [0.0])
    if tree > child:  # the tree's exact peak is then the root's own (unless a child grew in its last interval)
        root = max(root, tree)
    return {"wall_s": wall, "cpu_s": cpu, "root_peak_rss_mb": root, "root_peak_anon_mb": root_sample[4] / 2**20,
            "tree_peak_rss_mb": tree,
            "max_child_peak_rss_mb": child,
            "max_child_peak_private_mb": max([d["peak_private_mb"] for d in procs] or [0.0]), "children": procs}


def fit_power(n, y, exponents=np.arange(0.2, 3.0005, 0.001)) -> Dict[str, float]:
    """Least-squares fit of ``y = a + b * n**e`` (b >= 0): for each exponent on the grid, a and b are linear."""
    n, y = np.asarray(n, np.float64), np.asarray(y, np.float64)
    best = None
    for e in exponents:
        x = n ** e
        A = np.stack([np.ones_like(x), x], 1)
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        if b < 0:  # a falling curve: the flat fit is the honest one
            a, b = float(y.mean()), 0.0
        sse = float(((a + b * x - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-12 * max(1.0, float((y ** 2).sum())):
            best = (sse, float(a), float(b), float(e))
    _, a, b, e = best
    return {"a": a, "b": b, "e": e}


def bench_scale(a) -> dict:
    """Run one step's command at each size (``--point N COMMAND``); fit its CPU time, wall time and peak RSS
    (its own process and its largest child) to ``a + b * n^e`` and project each to ``--project`` products."""
    import shlex

    points = sorted((int(n), cmd) for n, cmd in a.point)
    if len(points) < 3:
        raise ValueError("bench scale needs --point at three sizes or more (three parameters are fitted)")
    runs = []
    for i, (n, cmd) in enumerate(points):
        log = os.path.join(a.log_dir, f"{a.step}-{n}.log") if a.log_dir else None
        r = measure_command(shlex.split(cmd), log=log)
        r["products"], r["command"] = n, cmd
        print(f"  {a.step} n={n:,}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak RSS "
              f"{r['root_peak_rss_mb']:.0f} MB (largest child {r['max_child_peak_rss_mb']:.0f} MB)", flush=True)
        runs.append(r)
    ns = [r["products"] for r in runs]
    big = a.project
    keys = ("cpu_s", "wall_s", "root_peak_rss_mb", "root_peak_anon_mb", "max_child_peak_rss_mb",
            "max_child_peak_private_mb")
    res = {"mode": "scale", "step": a.step, "project_to": big,
           "runs": {str(r["products"]): {k: r[k] for k in keys} for r in runs}}
    for key in keys:
        unit = "s" if key.endswith("_s") else "mb"
        ys = [r[key] for r in runs]
        if not all(ys):  # absent at some size (no child process there): nothing to fit
            continue
        f = fit_power(ns, ys)
        at = f["a"] + f["b"] * big ** f["e"]
        per = "us" if unit == "s" else "bytes"
        scale = 1e6 if unit == "s" else 2**20
        res[key] = {"fit_a": f["a"], "fit_b": f["b"], "exponent": f["e"],
                    f"{per}_per_product_largest": ys[-1] * scale / ns[-1],
                    f"{per}_per_product_above_fixed": (at - f["a"]) * scale / big,
                    f"projected_{unit}": at}
    if a.json and a.log_dir:  # every process of every run, for the record
        res["processes"] = {str(r["products"]): r["children"] for r in runs}
    res["env"] = environment()
    return res


# ---- baseline: PIL and torchvision.io in DataLoader workers, and bare decode ----------------------------
class _PilDataset:
    """The usual alternative: decode with PIL (EXIF orientation applied, as DALI does), random crop and flip
    of uint8 pixels (HWC, like our loader), in DataLoader workers."""

    def __init__(self, jpegs: List[bytes], crop: int, seed: int = 0):
        self.jpegs, self.crop, self.seed = jpegs, crop, seed

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        import io

        import torch
        from PIL import Image, ImageOps

        rng = np.random.default_rng((self.seed, i))
        img = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(self.jpegs[i]))).convert("RGB"))
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        img = img[y:y + self.crop, x:x + self.crop]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img)), 0


class _TorchvisionDataset:
    """The plain-PyTorch path an expert picks: ``torchvision.io.decode_jpeg`` (libjpeg-turbo, EXIF orientation
    applied) in DataLoader workers, random crop and flip on the uint8 CHW tensor."""

    def __init__(self, jpegs: List[bytes], crop: int, seed: int = 0):
        import torch

        self.jpegs = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        self.crop, self.seed = crop, seed

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        img = decode_jpeg(self.jpegs[i], mode=ImageReadMode.RGB, apply_exif_orientation=True)
        h, w = img.shape[1:]
        y = int(torch.randint(0, h - self.crop + 1, (), generator=g))
        x = int(torch.randint(0, w - self.crop + 1, (), generator=g))
        img = img[:, y:y + self.crop, x:x + self.crop]
        if bool(torch.rand((), generator=g) < 0.5):
            img = img.flip(2)
        return img.contiguous(), 0


def _dataloader_rate(ds, a) -> float:
    from torch.utils.data import DataLoader

    dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.threads, drop_last=True,
                    persistent_workers=True)
    batches = _endless(dl)
    rate, _ = timed_loop(lambda: next(batches)[0].shape[0], warmup=2, seconds=a.seconds)
    del batches, dl
    return rate


def _decode_rate(jpegs: List[bytes], seconds: float) -> tuple:
    """(images/s, images, CPU seconds) of one process decoding ``jpegs`` over and over for ``seconds``."""
    import simplejpeg

    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for j in jpegs:
            simplejpeg.decode_jpeg(j)
        n += len(jpegs)
    return n / (time.perf_counter() - t0), n, time.process_time() - c0


def bench_baseline(a) -> dict:
    import multiprocessing as mp

    jpegs = _jpegs(a.data, a.images)
    pil_rate = _dataloader_rate(_PilDataset(jpegs, a.crop), a)
    tv_rate = _dataloader_rate(_TorchvisionDataset(jpegs, a.crop), a)
    # The floor: libjpeg-turbo decodes alone, one process per thread, rates added.
    with mp.get_context("spawn").Pool(a.threads) as pool:
        runs = pool.starmap(_decode_rate, [(jpegs, a.seconds)] * a.threads)
    bare = float(sum(r[0] for r in runs))
    cpu_us = sum(r[2] for r in runs) * 1e6 / sum(r[1] for r in runs)  # the processes' own user + system time
    return {"mode": "baseline", "pil_dataloader": {"images_per_s": pil_rate},
            "torchvision_dataloader": {"images_per_s": tv_rate},
            "bare_decode": {"images_per_s": bare, "per_core_images_per_s": bare / a.threads,
                            "cpu_us_per_image": cpu_us},
            "env": environment(a.batch, a.threads)}


# ---- loader ----------------------------------------------------------------------------------------
def _sync_for(device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read: the GPU's synchronize, nothing on the CPU."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def bench_loader(a) -> dict:
    from dali_pipes.config import DataConfig
    from dali_pipes.loader import build_loader

    from dali_pipes.config import resolve_backend

    backend = resolve_backend(a.backend)
    cfg = DataConfig(path=a.data, backend=backend, batch_size=a.batch, num_threads=a.threads, crop=a.crop,
                     hw_decoder_load=a.hw_decoder_load, prefetch=a.prefetch)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    loader, steps = build_loader(cfg, 0, 1, "train")
    batches = _endless(loader)
    on = "cuda" if backend == "dali-gpu" else "cpu"  # no device given: the batches stay where DALI decoded them
    cpu: dict = {}
    # --epoch: exactly one epoch from the loader's start, start-up included (what a training epoch costs)
    rate, times = timed_loop(lambda: next(batches)[0].shape[0], warmup=0 if a.epoch else a.warmup,
                             seconds=a.seconds, max_steps=steps if a.epoch else None, sync=_sync_for(on), cpu=cpu)
    pct = percentiles_ms(times)
    res = {"mode": "loader", "backend": backend, "images_per_s": rate, "batch_ms_p50": pct["p50"],
           "batch_ms_p99": pct["p99"], "cpu_us_per_image": cpu["us_per_image"], "crop": a.crop,
           "graph": loader.graph}
    if a.epoch:
        import resource

        res["epoch"] = {"batches": len(times), "images": len(times) * a.batch, "wall_s": time.perf_counter() - t0,
                        "cpu_s": _cpu_seconds() - c0,
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    res["env"] = environment(a.batch, a.threads)
    return res


def rank_correlation(first: List[tuple], second: List[tuple]) -> float:
    """Spearman's rho of the positions of the items of ``first`` that ``second`` also holds (two visiting
    orders of distinct items); nan below 3 common items."""
    where = {k: i for i, k in enumerate(second)}
    pairs = np.array([(i, where[k]) for i, k in enumerate(first) if k in where], dtype=np.float64).reshape(-1, 2)
    if len(pairs) < 3:
        return float("nan")
    ranks = pairs.argsort(axis=0).argsort(axis=0).astype(np.float64)
    return float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])


def bench_order(a) -> dict:
    """How mixed the train batches are and how much the order changes between epochs, read by the loader
    itself: the mean number of distinct classes per batch (epoch 1, all ranks) and, per rank, the rank
    correlation of the images' positions in epochs 1 and 2. Also the loader's images/s (CPU seconds, this
    process and its threads) over those epochs."""
    from dali_pipes.config import DataConfig
    from dali_pipes.loader import build_loader

    cfg = DataConfig(path=a.data, backend="dali-cpu", batch_size=a.batch, num_threads=a.threads, crop=a.crop,
                     shuffle=a.shuffle, initial_fill=a.initial_fill)
    distinct, rho, images, wall, cpu = [], [], 0, 0.0, 0.0
    for rank in range(a.world_size):
        loader, _ = build_loader(cfg, rank, a.world_size, "train")
        loader.keep_ids = True
        orders = []
        for epoch in range(2):
            order: List[tuple] = []
            t, c = time.perf_counter(), _cpu_seconds()
            for _, labels in loader:
                pids, index = loader.last_ids
                order += zip(pids.tolist(), index.tolist())
                if epoch == 0:
                    distinct.append(len(set(labels.tolist())))
            wall, cpu, images = wall + time.perf_counter() - t, cpu + _cpu_seconds() - c, images + len(order)
            orders.append(order)
        rho.append(rank_correlation(*orders))
        del loader
    return {"mode": "order", "shuffle": a.shuffle, "world_size": a.world_size, "batch": a.batch,
            "initial_fill": a.initial_fill, "classes_per_batch": float(np.mean(distinct)),
            "classes_per_batch_min": int(min(distinct)), "rho_epoch1_epoch2": rho,
            "max_abs_rho": float(np.nanmax(np.abs(rho))), "images_per_s": images / wall,
            "images_per_cpu_s": images / cpu, "crop": a.crop, "env": environment(a.batch, a.threads)}


# ---- train: the trainer's own step, timed ----------------------------------------------------------
def _train_rate(a, backend: str, data: Optional[str], num_classes: int) -> dict:
    """images/s and data-wait share of full training steps, using ``train.train.Trainer`` unchanged."""
    import torch

    from train.config import from_dict
    from train.distributed import Dist
    from train.train import Trainer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = from_dict({
        "data": {"path": data or "", "backend": backend, "batch_size": a.batch, "crop": a.crop,
                 "num_threads": a.threads, "synthetic_num_classes": num_classes,
                 "synthetic_steps": a.warmup + a.steps},
        "model": {"name": a.model, "channels_last": a.channels_last, "compile": a.compile},
        "train": {"amp": a.amp, "tensorboard": False, "log_every": 1_000_000}})
    cfg.validate()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, Dist(device=dev))
        sync = _sync_for(dev)
        trainer.run_steps(a.warmup, housekeeping=False)
        sync()
        t0 = time.perf_counter()
        done = trainer.run_steps(a.steps, housekeeping=False)
        sync()
        elapsed = time.perf_counter() - t0
        trainer.close()
    return {"images_per_s": done.steps * a.batch / elapsed, "data_wait_share": done.data_wait_s / elapsed,
            "amp": trainer.cfg.train.amp}  # what the trainer used (dali_pipes.config.resolve_amp)


def bench_train(a) -> dict:
    if not a.data and not a.synthetic:
        raise SystemExit("bench train: give --data DATA, --synthetic, or both")
    from dali_pipes.config import resolve_backend

    backend = resolve_backend(a.backend)
    res = {"mode": "train", "model": a.model, "amp": a.amp, "channels_last": a.channels_last,
           "compile": a.compile, "crop": a.crop}
    num_classes = a.classes
    if a.data:
        from dali_pipes.dataset import open_dataset

        num_classes = open_dataset(a.data).num_classes
        res["real"] = dict(_train_rate(a, backend, a.data, num_classes), backend=backend)
        res["amp"] = res["real"].pop("amp")
    if a.synthetic:
        synthetic = _train_rate(a, "synthetic", None, num_classes)
        res["synthetic"], res["amp"] = {"images_per_s": synthetic["images_per_s"]}, synthetic["amp"]
    if "real" in res and "synthetic" in res:
        res["real_over_synthetic"] = res["real"]["images_per_s"] / res["synthetic"]["images_per_s"]
    res["num_classes"] = num_classes
    res["env"] = environment(a.batch, a.threads)
    return res


# ---- tune: the input setting that trains fastest -------------------------------------------------------
def tune_candidates(cuda: bool, cpus: int, batches: List[int], threads: Optional[List[int]] = None,
                    hw_loads: Optional[List[float]] = None) -> List[dict]:
    """The input settings ``bench tune`` tries at the first batch size: dali-gpu with each hardware-decoder
    share and thread count (GPU only), dali-cpu with each thread count. Synthetic data is timed apart.
    In the order they run, so that a ``--budget-s`` cut leaves out the least likely: on a GPU fewer decode
    threads and a hardware-decoder share of 0.5 first, then NVIDIA's MLPerf decoder settings (a share of
    0.99, a prefetch queue of 4, nvJPEG's threads not pinned; then also the window cut by the decoder), then
    the shares 0 and 1 (the order of the H200 measurement in BENCHMARKS.md), dali-cpu after them, the
    NVIDIA-recommended form first (whole decode on the CPU, crop and flip on the GPU in DALI); on a CPU more
    threads first. A candidate's ``options`` are further ``data.*`` values."""
    if cuda:
        gpu_threads = threads or sorted({min(4, cpus), min(8, cpus)})
        cpu_threads = threads or sorted({max(1, cpus // 2), max(1, cpus - 2)}, reverse=True)
        hw = hw_loads if hw_loads is not None else [0.5, 0.0, 1.0]
        out = [{"backend": "dali-gpu", "num_threads": t, "hw_decoder_load": h} for t in gpu_threads for h in hw]
        mlperf = {"prefetch": 4, "decoder_affine": False}
        out[1:1] = [{"backend": "dali-gpu", "num_threads": gpu_threads[0], "hw_decoder_load": 0.99, "options": o}
                    for o in (mlperf, dict(mlperf, gpu_decoder_crop=True))]
        out.append({"backend": "dali-cpu", "num_threads": cpu_threads[0], "hw_decoder_load": 0.0,
                    "options": {"gpu_augment": True}})
    else:
        cpu_threads = threads or sorted({max(1, cpus // 2), cpus}, reverse=True)
        out = []
    out += [{"backend": "dali-cpu", "num_threads": t, "hw_decoder_load": 0.0} for t in cpu_threads]
    return [dict(c, batch_size=batches[0]) for c in out]


def second_pass(modes: List[str], batches: List[int]) -> List[tuple]:
    """The (compile mode, batch size) pairs ``bench tune`` runs on the winning input setting after the first
    pass (``modes[0]``, ``batches[0]``), in order: the other batch sizes with the first mode (each batch size
    compiles anew), then each other mode at the fastest batch size so far (None: decided when it is reached;
    a mode compiles anew too, 40-60 s on a GPU, so the full cross product would not fit one remote call)."""
    return [(modes[0], b) for b in batches[1:]] + [(m, None) for m in modes[1:]]


def first_pass_budget(budget_s: float, n_later: int, first_run_s: float, candidate_s: float) -> float:
    """Seconds after which ``bench tune`` starts no new candidate in its first pass, so that each of the
    ``n_later`` second-pass pairs (``second_pass``) keeps what it needs: about what the first (synthetic) run
    took, since its warm-up compiled the model and each pair compiles anew, plus its synthetic row and the
    winner (``candidate_s`` each). ``budget_s`` 0 means no limit (and the result is then not used)."""
    if not budget_s or n_later < 1:
        return budget_s
    return max(0.0, budget_s - n_later * (first_run_s + 2 * candidate_s))


def _options(c: dict) -> dict:
    return c.get("options") or {}


def _candidate_name(c: dict) -> str:
    mode = f" {c['compile_mode']}" if c.get("compile_mode") else ""
    if c["backend"] == "synthetic":
        return f"synthetic b{c['batch_size']}{mode}"
    hw = f" hw{c['hw_decoder_load']:g}" if c["backend"] == "dali-gpu" else ""
    opts = "".join(f" {k}={v}" for k, v in _options(c).items())
    return f"{c['backend']} t{c['num_threads']}{hw}{opts} b{c['batch_size']}{mode}"


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def override_line(c: dict, recipe_batch: int, recipe_mode: Optional[str] = None) -> str:
    """The ``section.key=value`` words that select candidate ``c`` in ``train/run.sh``."""
    words = [f"data.backend={c['backend']}", f"data.num_threads={c['num_threads']}"]
    if c["backend"] == "dali-gpu":
        words.append(f"data.hw_decoder_load={c['hw_decoder_load']:g}")
    words += [f"data.{k}={_value(v)}" for k, v in _options(c).items()]
    if c["batch_size"] != recipe_batch:
        words.append(f"data.batch_size={c['batch_size']}")
    if c.get("compile_mode") and c["compile_mode"] != recipe_mode:
        words.append(f"model.compile_mode={c['compile_mode']}")
    return " ".join(words)


def _time_steps(trainer, loader, seconds: float, warmup: int, sync: Callable[[], None]) -> dict:
    """images/s and data-wait share of the trainer's own training step on ``loader``'s batches."""
    batches = _endless(loader)
    for _ in range(warmup):
        trainer.train_step(*trainer.prepare(*next(batches)))
    sync()
    steps, images, wait = 0, 0, 0.0
    t0 = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        x, y = next(batches)
        wait += time.perf_counter() - t1
        trainer.train_step(*trainer.prepare(x, y))
        steps, images = steps + 1, images + x.shape[0]
        if steps % 10 == 0:  # the host may not run far ahead of the device
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": images / dt, "data_wait_share": wait / dt, "steps": steps}


def bench_tune(a) -> dict:
    """Real training steps of the recipe's model (compiled as the recipe says) in two passes: each input
    setting of ``tune_candidates`` at the first batch size and compile mode, then the winner at the other
    batch sizes and compile modes (``second_pass``), with synthetic data at each pair. One model and optimizer
    per compile mode serve every candidate (the trainer's own ``prepare`` and ``train_step``), so the model is
    compiled once per batch size and mode; the first candidate's warm-up includes that compilation. Prints
    the real-data rows ranked and the winner's override line."""
    import dataclasses
    import gc

    import torch

    from dali_pipes.loader import build_loader
    from train.config import COMPILE_MODES, load_config
    from train.distributed import Dist
    from train.train import Trainer

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    recipe = a.recipe or ("resnet50" if cuda else "demo")
    cfg = load_config(recipe, list(a.override or []))
    cfg.data.path = a.data
    if a.model:
        cfg.model.name = a.model
    cfg.model.pretrained, cfg.train.init_from = None, None
    cfg.train.tensorboard, cfg.train.log_every, cfg.early_stop.after_epoch = False, 1_000_000, None
    if not cuda:
        cfg.data.backend = "dali-cpu"
    recipe_batch = cfg.data.batch_size
    batches = a.batches or ([recipe_batch, recipe_batch * 3 // 2, 2 * recipe_batch] if cuda else [recipe_batch])
    cfg.data.batch_size = batches[0]
    # One static graph per batch size (no dynamic-shape recompile that would time another kernel set).
    torch._dynamo.config.automatic_dynamic_shapes = False
    sync = _sync_for(dev)

    def release():
        gc.collect()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory
            ReleaseUnusedMemory()
        except ImportError:  # pragma: no cover
            pass

    rows: Dict[str, dict] = {}
    t_start = time.perf_counter()
    recipe_mode = cfg.model.compile_mode
    modes = (a.modes or ([recipe_mode] + [m for m in COMPILE_MODES if m != recipe_mode] if cuda else [recipe_mode])
             if cfg.model.compile else [recipe_mode])
    tag = (lambda m: {"compile_mode": m}) if cfg.model.compile else (lambda m: {})
    with tempfile.TemporaryDirectory() as run_dir:
        held = {}  # the one trainer in use: its compile mode and itself

        def trainer_for(mode: str):
            if held.get("mode") != mode:  # a compile mode is another compiled model: a trainer of its own
                if held:
                    held.pop("trainer").close()
                    release()
                cfg.model.compile_mode = mode
                held.update(mode=mode, trainer=Trainer(cfg, os.path.join(run_dir, mode), Dist(device=dev)))
            return held["trainer"]

        num_classes = trainer_for(modes[0]).num_classes

        def run(c: dict) -> dict:
            if c["backend"] == "synthetic":
                dc = dataclasses.replace(cfg.data, backend="synthetic", batch_size=c["batch_size"],
                                         synthetic_num_classes=num_classes, synthetic_steps=1000)
            else:
                dc = dataclasses.replace(cfg.data, backend=c["backend"], num_threads=c["num_threads"],
                                         hw_decoder_load=c["hw_decoder_load"], batch_size=c["batch_size"],
                                         **_options(c))
            name = _candidate_name(c)
            t0 = time.perf_counter()
            try:
                trainer = trainer_for(c.get("compile_mode", recipe_mode))
                loader, _ = build_loader(dc, 0, 1, "train", device=dev)
                r = _time_steps(trainer, loader, a.seconds, a.warmup, sync)
                del loader
            except torch.cuda.OutOfMemoryError:
                r = {"error": "out of GPU memory"}
            release()
            r = dict(c, **r, seconds=round(time.perf_counter() - t0, 1))
            rows[name] = r
            if a.json:  # what is measured so far survives a timeout
                from dali_pipes.fileio import atomic_write_text
                atomic_write_text(a.json, json.dumps({"mode": "tune", "partial": True, "candidates": rows}, indent=1))
            rate = f"{r['images_per_s']:9,.0f} img/s, data wait {r['data_wait_share']:5.1%}" if "images_per_s" in r \
                else r["error"]
            print(f"  {name:<28} {rate}   ({r['seconds']:.0f} s)", flush=True)
            return r

        def measured():
            return [r for r in rows.values() if r["backend"] != "synthetic" and "images_per_s" in r]

        def over_budget(limit: float) -> bool:  # never before one real-data candidate has run
            return bool(a.budget_s) and time.perf_counter() - t_start > limit and bool(measured())

        synthetic = {"backend": "synthetic", "num_threads": 0, "hw_decoder_load": 0.0}
        # First pass: every input setting at the first batch size and compile mode.
        later = second_pass(modes, batches)
        first = run(dict(synthetic, batch_size=batches[0], **tag(modes[0])))
        limit = first_pass_budget(a.budget_s, len(later), first["seconds"], a.seconds + 3)
        for c in tune_candidates(cuda, os.cpu_count() or 1, batches, a.threads_list, a.hw_loads):
            c = dict(c, **tag(modes[0]))
            if over_budget(limit):
                why = (f"past {limit:.0f} s: the rest of --budget-s {a.budget_s:g} is kept for the second pass"
                       if limit < a.budget_s else f"past --budget-s {a.budget_s:g}")
                print(f"  {_candidate_name(c):<28} skipped: {why}", flush=True)
                continue
            run(c)
        # Second pass: the winning input setting at the other batch sizes, then in the other compile modes.
        win = {k: v for k, v in max(measured(), key=lambda r: r["images_per_s"]).items()
               if k in ("backend", "num_threads", "hw_decoder_load", "options")}
        for mode, b in later:
            if b is None:
                b = max(measured(), key=lambda r: r["images_per_s"])["batch_size"]
            what = f"batch {b}" + (f" {mode}" if tag(mode) else "")
            if over_budget(a.budget_s):
                print(f"  {what}: skipped, past --budget-s {a.budget_s:g}", flush=True)
                continue
            s_row = run(dict(synthetic, batch_size=b, **tag(mode)))
            if "error" not in s_row:  # out of memory with synthetic data: real data would be too
                run(dict(win, batch_size=b, **tag(mode)))
        if held:
            held["trainer"].close()
    real = measured()
    if not real:
        raise ValueError("bench tune: no candidate ran (see the errors above)")
    best = max(real, key=lambda r: r["images_per_s"])
    synth = rows.get(_candidate_name(dict(best, backend="synthetic")), {})
    for r in rows.values():
        s = rows.get(_candidate_name(dict(r, backend="synthetic")), {})
        if "images_per_s" in r and s.get("images_per_s"):
            r["over_synthetic"] = r["images_per_s"] / s["images_per_s"]
    line = override_line(best, recipe_batch, recipe_mode)
    print("ranked (real data):")
    for i, r in enumerate(sorted(real, key=lambda r: -r["images_per_s"]), 1):
        ratio = f"{r['over_synthetic']:.2f}x synthetic" if "over_synthetic" in r else ""
        print(f"  {i:2d}. {_candidate_name(r):<44} {r['images_per_s']:9,.0f} img/s  data wait "
              f"{r['data_wait_share']:5.1%}  {ratio}")
    print(f"fastest: {_candidate_name(best)}: {best['images_per_s']:,.0f} images/s"
          + (f" ({best['over_synthetic']:.2f}x synthetic {synth['images_per_s']:,.0f})" if "over_synthetic" in best else ""))
    print(f"override: {line}")
    return {"mode": "tune", "recipe": recipe, "model": cfg.model.name, "compile": cfg.model.compile,
            "compile_modes": modes, "amp": cfg.train.amp, "num_classes": num_classes, "override": line,
            "best": _candidate_name(best), "seconds": round(time.perf_counter() - t_start, 1), "candidates": rows,
            "env": environment(batches[0], None)}


# ---- predict -------------------------------------------------------------------------------------------
def bench_predict(a) -> dict:
    """End to end: one ``train.predict.predict`` call (loader start-up included), against forward-only: the
    same models and TTA (``train.predict.Scorer``) on the first ``--forward-batches`` batches of the same
    loader, kept in memory. With ``--bson`` the unlabelled repack is timed on its own first."""
    import torch

    from dali_pipes.dataset import open_dataset
    from tools.predict import cleanup, repack_for_predict
    from train.predict import Scorer, load_ensemble, make_loader, picture_setting, predict, resolve_placement

    if bool(a.data) == bool(a.bson):
        raise ValueError("bench predict: give either --data DATA_TEST (an unlabelled repack) or --bson test.bson")
    backend, device = resolve_placement(a.backend, a.device)
    members = load_ensemble(a.checkpoint, device, a.tiled)
    first = [m for m in members if picture_setting(m) == picture_setting(members[0])]  # forward-only: its loader
    res = {"mode": "predict", "backend": backend, "device": device.type, "tta": a.tta, "models": len(members)}
    sync = _sync_for(device)
    work = None
    try:
        data = a.data
        if a.bson:
            t0 = time.perf_counter()
            data, work = repack_for_predict(a.bson, a.tmp, workers=a.threads)
            dt = time.perf_counter() - t0
            counts = open_dataset(data).manifest["counts"]
            res["repack"] = {"seconds": dt, "products_per_s": counts["products_read"] / dt,
                             "images_per_s": counts["images_read"] / dt}
        loader = make_loader(members[0], data, backend, a.batch, a.threads, device)
        batches = []
        for images, _, _ in loader:
            batches.append(images.to(device).clone())
            if len(batches) >= a.forward_batches:
                break
        del loader
        scorer = Scorer(first, a.tta, device)
        n_forward = sum(b.shape[0] for b in batches)

        def forward_pass():
            for b in batches:
                scorer(b)
            return n_forward

        with torch.no_grad():
            fwd, _ = timed_loop(forward_pass, warmup=1, seconds=a.seconds, sync=sync)
        del batches
        with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
            t0 = time.perf_counter()
            s = predict(data, members, os.path.join(tmp, "sub.csv"), batch=a.batch, backend=backend, device=device,
                        threads=a.threads, tta=a.tta, kind_weights=dict(a.weight), progress=False)
            dt = time.perf_counter() - t0
    finally:
        cleanup(work)
    e2e = s["images"] / dt
    res.update({
        "images": s["images"], "products": s["products"],
        "images_per_s": e2e, "products_per_s": s["products"] / dt,  # end to end
        "end_to_end": {"seconds": dt, "loader_build_seconds": s["loader_build_seconds"],
                       "loop_images_per_s": s["images"] / s["loop_seconds"], "data_wait_share": s["data_wait_share"],
                       "flip_one_pass": s["flip_one_pass"],
                       "settings": {r["setting"]: {k: v for k, v in r.items() if k != "setting"}
                                    for r in s["settings"]}},
        "forward_only": {"images_per_s": fwd, "batches": a.forward_batches, "images": n_forward,
                         "models": len(first)},  # the first member's picture setting
        "end_to_end_over_forward_only": e2e / fwd,
        "env": environment(a.batch, a.threads)})
    return res


# ---- ocr: tools.ocr's reader per detector size, its CPU cost and word accuracy on generated titles -------
COMPETITION_IMAGES = {"train": 12_371_293, "test": 3_095_080}


def _title_words(titles_csv: Optional[str]) -> Dict[tuple, List[str]]:
    if not titles_csv:
        return {}
    import csv

    with open(titles_csv, newline="") as f:
        return {(int(r["_id"]), int(r["image_index"])): r["title"].split() for r in csv.DictReader(f)}


def _word_accuracy(reads: List[List[str]], keys: List[tuple], titles: Dict[tuple, List[str]]) -> dict:
    """Share of the printed words found in what was read (spaces ignored: the recognizer often drops them),
    accents folded (PP-OCRv4 has none) and as printed, for words with and without accents."""
    from dali_pipes.ocr_files import normalize_word
    from tools.synthetic_text import has_accent

    hits = {"plain": [0, 0], "accented": [0, 0], "accented_as_printed": [0, 0]}
    other_with_text = others = 0
    for words, key in zip(reads, keys):
        want = titles.get(key)
        if want is None:
            others += 1
            other_with_text += bool(words)
            continue
        folded = "".join(normalize_word(w) for w in words)
        raw = "".join(words).lower()
        for w in want:
            kind = "accented" if has_accent(w) else "plain"
            hits[kind][0] += normalize_word(w) in folded
            hits[kind][1] += 1
            if kind == "accented":
                hits["accented_as_printed"][0] += w.lower() in raw
                hits["accented_as_printed"][1] += 1
    out = {k: v[0] / v[1] if v[1] else None for k, v in hits.items()}
    n_all = hits["plain"][1] + hits["accented"][1]
    out["all"] = (hits["plain"][0] + hits["accented"][0]) / n_all if n_all else None
    out["words"] = n_all
    out["other_pictures_with_text"] = other_with_text / others if others else None
    return out


def bench_ocr(a) -> dict:
    from tools.ocr import Reader, decode_bgr, read_range
    from dali_pipes.dataset import open_dataset
    from dali_pipes.ocr_files import image_shards

    ds = open_dataset(a.data)
    recs = []
    for _, info in image_shards(ds):
        recs += read_range(os.path.join(ds.root, info["path"]), os.path.join(ds.root, info["index"]), 0,
                           a.images - len(recs))
        if len(recs) >= a.images:
            break
    imgs = [decode_bgr(r["image"]) for r in recs]
    keys = [(r["product_id"], r["image_index"]) for r in recs]
    titles = _title_words(a.titles)
    res: Dict[str, object] = {"images": len(imgs), "titled_images": sum(k in titles for k in keys)}
    for det in a.det_sizes:
        for cls in ([False, True] if a.angle_cls else [False]):
            reader = Reader(det, "cpu", cls, threads=1, rec_batch=a.rec_batch)
            reader.read(imgs[:2])  # warm-up
            c0 = time.process_time()
            for im in imgs:
                reader.det(im)
            det_s = time.process_time() - c0
            c0 = time.process_time()
            reads = []
            for i in range(0, len(imgs), a.batch):
                reads += [w for w, _ in reader.read(imgs[i:i + a.batch])]
            total_s = time.process_time() - c0
            per = total_s / len(imgs)
            name = f"det{det}" + ("_cls" if cls else "")
            res[name] = {"cpu_ms_per_image": per * 1e3, "detector_ms": det_s / len(imgs) * 1e3,
                         "images_per_cpu_s": 1 / per,
                         "projected_cpu_hours": {k: n * per / 3600 for k, n in COMPETITION_IMAGES.items()},
                         "word_accuracy": _word_accuracy(reads, keys, titles) if titles else None}
    res["env"] = environment(batch=a.batch, threads=1)
    return res


# ---- command line ------------------------------------------------------------------------------------
def _common(p, data_required=True):
    p.add_argument("--data", required=data_required, help="a repacked DATA directory")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", help="write every figure and the environment to this file")


def build_parser() -> argparse.ArgumentParser:
    from tools import predict as predict_cli  # its --tiled and --weight syntax
    from train.config import COMPILE_MODES

    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("baseline", help="PIL and torchvision.io DataLoaders, and a bare libjpeg-turbo decode loop")
    _common(p)
    p.add_argument("--images", type=int, default=2048, help="JPEGs taken from the train split")
    p = sub.add_parser("loader", help="images/s of the DALI loader alone (train pipeline)")
    _common(p)
    p.add_argument("--backend", choices=["dali-gpu", "dali-cpu"], default=None,
                   help="default: dali-gpu with CUDA, else dali-cpu (README: backend policy)")
    p.add_argument("--hw-decoder-load", type=float, default=0.65)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--epoch", action="store_true", help="time one whole epoch from the start (no warm-up, "
                                                        "--seconds ignored), with its CPU time and peak RSS")
    p = sub.add_parser("train", help="images/s of full training steps, real data and/or synthetic")
    _common(p, data_required=False)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--synthetic", action="store_true", help="also (or only) time random tensors on the device")
    p.add_argument("--backend", choices=["dali-gpu", "dali-cpu"], default=None,
                   help="loader for --data (default: dali-gpu with CUDA, else dali-cpu)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--classes", type=int, default=5270, help="classes of the synthetic-only run")
    p = sub.add_parser("tune", help="time real training steps for each input setting; print the fastest")
    p.add_argument("--data", required=True, help="a repacked DATA directory")
    p.add_argument("--recipe", help="recipe whose model, amp, compile and data settings are used "
                                    "(default: resnet50 with a GPU, demo without)")
    p.add_argument("--model", help="model.name instead of the recipe's")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: the recipe's, 1.5x and twice it "
                                                           "on a GPU); the first one tries every setting")
    p.add_argument("--threads-list", type=int, nargs="+", help="DALI thread counts to try")
    p.add_argument("--hw-loads", type=float, nargs="+", help="dali-gpu hw_decoder_load values (default 0 0.5 1)")
    p.add_argument("--modes", nargs="+", choices=COMPILE_MODES,
                   help="torch.compile modes of the second pass, the first also of the first pass (default: the "
                        "recipe's, then the others, on a GPU with model.compile; else the recipe's)")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per candidate")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per candidate")
    p.add_argument("--budget-s", type=float, default=0, help="start no new candidate after this many seconds "
                                                             "(0: no limit); the fastest so far is reported")
    p.add_argument("--override", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.add_argument("--json", help="write every figure and the environment to this file")
    p = sub.add_parser("predict", help="end-to-end predict vs forward-only images/s on an unlabelled repack")
    _common(p, data_required=False)
    p.add_argument("--bson", help="a test BSON instead of --data: its unlabelled repack is timed on its own")
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--tiled", type=predict_cli.tiled_spec, action="append", default=[], metavar="K=CHECKPOINT",
                   help="as tools.predict --tiled: members for the products of K images (1: upsized)")
    p.add_argument("--weight", type=predict_cli.kind_weight, action="append", default=[], metavar="KIND=W",
                   help="as tools.predict --weight")
    p.add_argument("--forward-batches", type=int, default=20, help="batches kept in memory for forward-only")
    p.add_argument("--tmp", default=None, help="where the --bson repack and the submission go (deleted)")
    p.add_argument("--backend", choices=["dali-gpu", "dali-cpu"], default=None,
                   help="JPEG decoding; default: dali-gpu with CUDA (dali-cpu with --device cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="where the models run, whatever the backend; default: cuda when available")
    p.add_argument("--tta", choices=["none", "flip"], default="none")
    p = sub.add_parser("ocr", help="tools.ocr's CPU ms per picture (one thread) per detector size, and its word "
                                   "accuracy on make_synthetic --text-categories titles")
    p.add_argument("--data", required=True, help="a repacked DATA directory")
    p.add_argument("--titles", help="image_titles.csv of the generated set (word accuracy)")
    p.add_argument("--images", type=int, default=256, help="pictures taken from the shards, in order")
    p.add_argument("--det-sizes", type=int, nargs="+", default=[736, 192], help="detector input sizes")
    from tools.ocr import DEFAULT_BATCH as OCR_BATCH, DEFAULT_REC_BATCH

    p.add_argument("--batch", type=int, default=OCR_BATCH, help="pictures whose text boxes are recognized together")
    p.add_argument("--rec-batch", type=int, default=DEFAULT_REC_BATCH, help="text boxes per recognizer call (padded to the "
                                                             "widest)")
    p.add_argument("--angle-cls", action="store_true", help="also time each size with the angle classifier")
    p.add_argument("--json")
    p = sub.add_parser("repack", help="repack throughput next to a bare BSON scan")
    p.add_argument("--bson", required=True)
    p.add_argument("--categories", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size-mb", type=float, default=32)
    p.add_argument("--verify", nargs="+", choices=["header", "decode"], default=["decode"],
                   help="JPEG check(s) to time, each with every --workers count (default: repack's)")
    p.add_argument("--tmp", default=None, help="where the repacked copies go (deleted afterwards)")
    p.add_argument("--json")
    p = sub.add_parser("scale", help="one step's wall/CPU time and peak RSS (process and children) at several "
                                     "sizes, fitted to a + b*n^e and projected")
    p.add_argument("--step", required=True, help="a name for the step (labels the output and the logs)")
    p.add_argument("--point", nargs=2, action="append", required=True, metavar=("PRODUCTS", "COMMAND"),
                   help="a size and the command line that processes it (quoted); three or more")
    p.add_argument("--project", type=int, default=7_069_896, help="products to project to (train.bson's)")
    p.add_argument("--log-dir", help="keep each command's output here (STEP-N.log); else it is discarded")
    p.add_argument("--json")
    p = sub.add_parser("order", help="classes per train batch and the epoch-1/epoch-2 rank correlation per rank")
    _common(p)
    p.set_defaults(batch=256, crop=32)  # a small window: the order is what counts here, not the decode
    p.add_argument("--world-size", type=int, default=1, help="ranks, read one after the other")
    p.add_argument("--shuffle", choices=SHUFFLES, default=DataConfig.shuffle,
                   help="data.shuffle (buffer: the loader of before, sequential reads)")
    p.add_argument("--initial-fill", type=int, default=DataConfig.initial_fill, help="data.initial_fill")
    return ap


MODES = {"baseline": bench_baseline, "repack": bench_repack, "loader": bench_loader, "train": bench_train,
         "tune": bench_tune, "order": bench_order,
         "predict": bench_predict, "ocr": bench_ocr, "scale": bench_scale}


@interruptible("bench")
def main(argv=None) -> int:
    from dali_pipes.dataset import DatasetError
    from dali_pipes.writer.repack import RepackError
    from tools.ocr import OcrUnavailable
    from train.predict import PredictError

    a = build_parser().parse_args(argv)
    print(f"bench {a.mode}:")
    try:
        result = MODES[a.mode](a)
    except (DatasetError, RepackError, PredictError, OcrUnavailable, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    report(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
