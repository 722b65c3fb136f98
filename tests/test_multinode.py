"""Two nodes on one machine: two ``train/run.sh`` processes with ``NNODES=2``, one CPU process each (gloo),
the demo recipe for a few steps on generated data.

- static rendezvous (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and c10d rendezvous (``RDZV_ENDPOINT``):
  both nodes trained (the first logged loss is the mean of the two ranks' first-batch losses, recomputed here
  from each rank's own shard), exactly one node printed and one checkpoint (of a 2-process run) was written;
- a node killed mid-run, or frozen (the collective timeout ``train.dist_timeout_s``), makes the other stop
  with a message that says so, instead of hanging.

``CUDA_VISIBLE_DEVICES`` is emptied: the same CPU/gloo test on a GPU machine.
"""
import functools
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import process_tree
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "train", "run.sh")
STEPS = 4
OVERRIDES = ["data.crop=64", "data.batch_size=8", "data.num_threads=1", "train.log_every=1",
             "train.tensorboard=false", "early_stop.after_epoch=null", "train.deterministic=true"]
# A collective that waits longer than this ends the run (the frozen-node test waits that long once).
DIST_TIMEOUT_S = 10
HANG_GUARD_S = 300  # a test that waits this long for a node has found a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(run, data, log, extra_env, overrides):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", NNODES="2",
               **extra_env)
    env.pop("TRAIN_STATUS_FILE", None)
    f = open(log, "w")
    p = subprocess.Popen([RUN_SH, "demo", "--data", str(data), "--out", str(run), "--nproc", "1", *OVERRIDES,
                          *overrides], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                         start_new_session=True)  # its own process group: torchrun's agent and worker together
    f.close()
    return p


def static_env(port):
    return [dict(NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in (0, 1)]


def c10d_env(port):
    return [dict(RDZV_ENDPOINT=f"127.0.0.1:{port}", RDZV_ID="two-nodes-test")] * 2


def node_pids(p):
    """A node's processes: run.sh, torchrun's agent and its workers."""
    return process_tree(p.pid)


def signal_node(p, sig):
    for pid in node_pids(p):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_all(procs):
    for p in procs:
        signal_node(p, signal.SIGKILL)
        p.wait()


def wait_all(procs, logs):
    try:
        for p in procs:
            p.wait(timeout=HANG_GUARD_S)
    finally:
        kill_all(procs)
    return [open(log).read() for log in logs]


def records(run, kind):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@functools.lru_cache(maxsize=None)  # the same for both rendezvous tests: computed once
def first_batch_losses(data):
    """Each rank's loss on its first training batch, computed here: the model the trainer builds (the same
    seed), each rank's loader of a 2-process run (its own shard), plain cross-entropy."""
    from dali_pipes.loader import build_loader
    from models import create_model
    from train.config import load_config

    cfg = load_config("demo", OVERRIDES)
    cfg.data.path = str(data)
    losses, batches = [], []
    for rank in (0, 1):
        loader, _ = build_loader(cfg.data, rank, 2, "train")
        images, labels = next(iter(loader))
        torch.manual_seed(cfg.train.seed)
        model = create_model(cfg.model.name, loader.num_classes, head=cfg.model.head).train()
        with torch.no_grad():  # the model takes the loader's batch as it comes (it normalizes it itself)
            losses.append(float(F.cross_entropy(model(images), labels.view(-1).long())))
        batches.append(images)
    assert not torch.equal(batches[0], batches[1])
    return losses


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_train_together(data_dir, tmp_path, rendezvous):
    run = tmp_path / "run"
    port = free_port()
    envs = static_env(port) if rendezvous == "static" else c10d_env(port)
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    procs = [start_node(run, data_dir, logs[i], envs[i], [f"train.max_steps={STEPS}"]) for i in (0, 1)]
    out = wait_all(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(out)

    # one node printed (rank 0's; with c10d either node may get rank 0) and wrote the run's files
    printing = [i for i in (0, 1) if "new run: tiny" in out[i]]
    assert len(printing) == 1, out
    assert "2 process(es)" in out[printing[0]] and f"done: {STEPS} steps" in out[printing[0]]
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt") or ".tmp" in f) == ["best.pt", "last.pt"]
    ck = checkpoint.load(str(run / "last.pt"))
    assert ck["step"] == STEPS and ck["status"] == "finished" and ck["world_size"] == 2
    assert [s["rank"] for s in ck["loader_states"]] == [0, 1]
    assert ck["loader_states"][0] != ck["loader_states"][1]  # two readers, at their own positions

    # both ranks trained, each on its own shard, and the logged loss is reduced over both
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    l0, l1 = first_batch_losses(str(data_dir))
    assert abs(l0 - l1) > 1e-3  # the two shards' batches are told apart by their loss
    assert train[0]["loss"] == pytest.approx((l0 + l1) / 2, rel=1e-4, abs=1e-5)
    val = records(run, "val")[-1]
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))["splits"]["val"]
    assert (val["images"], val["products"]) == (manifest["images"], manifest["products"])


def _start_and_wait_for_training(run, data, tmp_path):
    """Two static-rendezvous nodes on a long run, once both are in the training loop."""
    logs = [tmp_path / f"node{i}.log" for i in (0, 1)]
    envs = static_env(free_port())
    procs = [start_node(run, data, logs[i], envs[i], ["train.max_steps=100000", "train.epochs=1000",
                                                       f"train.dist_timeout_s={DIST_TIMEOUT_S}"]) for i in (0, 1)]
    deadline = time.monotonic() + HANG_GUARD_S
    while len(records(run, "train")) < 2:  # past the first steps' collectives
        assert all(p.poll() is None for p in procs), [open(log).read() for log in logs]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    return procs, logs


def _stops_with_lost_contact(proc, log, what):
    proc.wait(timeout=HANG_GUARD_S)  # a hang fails here
    out = open(log).read()
    assert proc.returncode == 4, out
    assert "lost contact with the other processes of the run" in out and what in out, out
    return out


def test_killed_node_stops_the_other(data_dir, tmp_path):
    """Node 0 (rank 0, the rendezvous store's host) killed mid-run: node 1 stops at its next collective."""
    run = tmp_path / "run"
    procs, logs = _start_and_wait_for_training(run, data_dir, tmp_path)
    try:
        signal_node(procs[0], signal.SIGKILL)
        out = _stops_with_lost_contact(procs[1], logs[1], "rank 1 of 2")
        assert "Connection" in out  # gloo's words: reset or closed by peer
    finally:
        kill_all(procs)


def test_frozen_node_times_out(data_dir, tmp_path):
    """Node 1 stopped (SIGSTOP: alive, its sockets open, no answer, as a hung or cut-off machine): node 0
    gives up after train.dist_timeout_s."""
    run = tmp_path / "run"
    procs, logs = _start_and_wait_for_training(run, data_dir, tmp_path)
    try:
        signal_node(procs[1], signal.SIGSTOP)
        out = _stops_with_lost_contact(procs[0], logs[0], "rank 0 of 2")
        assert f"{DIST_TIMEOUT_S * 1000}ms" in out  # gloo: "Timed out waiting 10000ms for recv ..."
    finally:
        kill_all(procs)


@pytest.mark.parametrize("text", [
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection closed by peer [10.0.0.2]:1234",
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer",  # the killed node here
    "Application timeout caused pair closure",  # gloo, a frozen peer caught inside DDP's backward allreduce
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation",
    "NCCL communicator was aborted on rank 0. Original reason for failure was: watchdog timeout",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=8, OpType=ALLREDUCE) ran for 600012 "
    "milliseconds before timing out.",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL version 2.21.5",
])
def test_lost_contact_names_what_the_collective_said(text):
    from train.distributed import Dist, lost_contact

    d = Dist(rank=0, world_size=2)
    msg = lost_contact(RuntimeError(text), d)
    assert msg and msg.startswith("rank 0 of 2 lost contact") and "RUN/last.pt" in msg


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # NCCL's own failures: the backend error type, the backend named, no peer lost
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with "
                                       "NCCL_DEBUG=INFO for details), NCCL version 2.21.5\nncclUnhandledCudaError: "
                                       "Call to CUDA function failed. Last error: Cuda failure 'out of memory'"),
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage (run with "
                                       "NCCL_DEBUG=WARN for details), NCCL version 2.21.5"),
    RuntimeError("NCCL communicator was aborted on rank 0. Original reason for failure was: NCCL error: "
                 "unhandled cuda error"),
    RuntimeError("CUDA error: the launch timed out and was terminated"),  # a timeout, no process group
    ValueError("data.batch_size must be > 0"),
])
def test_other_errors_are_not_lost_contact(error):
    from train.distributed import Dist, lost_contact

    assert lost_contact(error, Dist(rank=0, world_size=2)) is None
