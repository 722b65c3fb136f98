"""Throughput benchmarks: one tool, one code path per stage, numbers as ratios.

    python -m tools.bench loader   --data DATA [--backend dali-cpu|dali-gpu] [--batch B] [--threads T]
    python -m tools.bench baseline --data DATA [--batch B] [--threads T]
    python -m tools.bench train    --model resnet50 [--data DATA] [--synthetic] [--amp bf16|fp16|off] ...
    python -m tools.bench predict  --data DATA --checkpoint RUN/best.pt
    python -m tools.bench repack   --bson train.bson --categories category_names.csv [--workers 1 2]

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


# ---- environment and output ----------------------------------------------------------------------
def environment(batch: Optional[int] = None, threads: Optional[int] = None) -> dict:
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "batch": batch, "threads": threads}
    try:
        import torch

        env["torch"] = torch.__version__
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
        tmp = f"{json_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, json_path)
    return result


def percentiles_ms(times: List[float]) -> Dict[str, float]:
    a = np.asarray(times) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def timed_loop(step: Callable[[], int], warmup: int, seconds: float, max_steps: Optional[int] = None,
               sync: Callable[[], None] = lambda: None):
    """Run ``step`` (returns images done) ``warmup`` times, then for ``seconds`` (or ``max_steps``);
    return (images/s, per-step times)."""
    for _ in range(warmup):
        step()
    sync()
    times, images = [], 0
    t0 = last = time.perf_counter()
    while True:
        images += step()
        sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if (max_steps and len(times) >= max_steps) or (not max_steps and now - t0 >= seconds):
            break
    return images / (last - t0), times


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

    from dali_pipes.repack import repack

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
        for w in a.workers:
            t0 = time.perf_counter()
            m = repack(a.bson, os.path.join(tmp, f"w{w}"), categories=a.categories, workers=w,
                       shard_size_mb=a.shard_size_mb, overwrite=True, progress=False)
            dt = time.perf_counter() - t0
            mbs = size / 1e6 / dt
            res[f"workers_{w}"] = {"mb_per_s": mbs, "products_per_s": m["counts"]["products_read"] / dt,
                                   "per_core_over_bare_scan": mbs / w / res["bare_scan"]["mb_per_s"]}
    res["env"] = environment(threads=max(a.workers))
    return res


# ---- baseline: PIL + DataLoader, and bare decode ---------------------------------------------------
class _PilDataset:
    """The usual alternative: decode with PIL, random crop, flip, normalize, in DataLoader workers."""

    def __init__(self, jpegs: List[bytes], crop: int, seed: int = 0):
        self.jpegs, self.crop, self.seed = jpegs, crop, seed
        self.mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
        self.std = np.array([0.229, 0.224, 0.225], np.float32) * 255

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        import io

        import torch
        from PIL import Image

        rng = np.random.default_rng((self.seed, i))
        img = np.asarray(Image.open(io.BytesIO(self.jpegs[i])).convert("RGB"))
        h, w = img.shape[:2]
        y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        img = img[y:y + self.crop, x:x + self.crop]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = (img.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), 0


def _decode_rate(jpegs: List[bytes], seconds: float) -> float:
    import simplejpeg

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for j in jpegs:
            simplejpeg.decode_jpeg(j)
        n += len(jpegs)
    return n / (time.perf_counter() - t0)


def bench_baseline(a) -> dict:
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader

    jpegs = _jpegs(a.data, a.images)
    ds = _PilDataset(jpegs, a.crop)
    dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.threads, drop_last=True,
                    persistent_workers=True)
    state = {"it": iter(dl)}

    def step():
        try:
            x, _ = next(state["it"])
        except StopIteration:
            state["it"] = iter(dl)
            x, _ = next(state["it"])
        return x.shape[0]

    pil_rate, _ = timed_loop(step, warmup=2, seconds=a.seconds)
    del state, dl
    # The floor: libjpeg-turbo decodes alone, one process per thread, rates added.
    with mp.get_context("spawn").Pool(a.threads) as pool:
        rates = pool.starmap(_decode_rate, [(jpegs, a.seconds)] * a.threads)
    bare = float(sum(rates))
    torch.set_num_threads(torch.get_num_threads())
    return {"mode": "baseline", "pil_dataloader": {"images_per_s": pil_rate},
            "bare_decode": {"images_per_s": bare, "per_core_images_per_s": bare / a.threads},
            "env": environment(a.batch, a.threads)}


# ---- command line ------------------------------------------------------------------------------------
def _common(p, data_required=True):
    p.add_argument("--data", required=data_required, help="a repacked DATA directory")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", help="write every figure and the environment to this file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("baseline", help="PIL + DataLoader, and a bare libjpeg-turbo decode loop")
    _common(p)
    p.add_argument("--images", type=int, default=2048, help="JPEGs taken from the train split")
    p = sub.add_parser("repack", help="repack throughput next to a bare BSON scan")
    p.add_argument("--bson", required=True)
    p.add_argument("--categories", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size-mb", type=float, default=32)
    p.add_argument("--tmp", default=None, help="where the repacked copies go (deleted afterwards)")
    p.add_argument("--json")
    return ap


MODES = {"baseline": bench_baseline, "repack": bench_repack}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    print(f"bench {a.mode}:")
    report(MODES[a.mode](a), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
