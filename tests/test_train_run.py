"""The trainer end to end on generated data: real TFRecords, real DALI (CPU), real torch training.

- the demo recipe learns the generated set and writes checkpoints, metrics and the curves PNG;
- DDP with 2 processes (gloo, dali-cpu): disjoint data per rank, identical parameters after several steps;
- a run killed with SIGKILL mid-epoch and started again ends bit-equal to an uninterrupted run; so does one
  stopped by SIGTERM/SIGUSR1 (to run.sh, to torchrun, to the worker), which checkpoints and exits 5;
- one run per RUN directory: a second start while one runs is refused (exit 2, naming the holder), and the
  workers of a launcher killed with SIGKILL die with it;
- refusals (another model's checkpoint), the early-stop rule and a non-finite loss end runs with clear messages;
- fine-tuning on tiled products starts from an ``init_from`` checkpoint of the same class map.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.conftest import DEMO_FIXTURE, process_tree, tb_steps
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "train", "run.sh")
# Small and fast: the tiny model on 64 crops, 8 per batch, 1.5 epochs (ends mid-epoch), deterministic.
SMALL = ["data.crop=64", "data.batch_size=8", "data.num_threads=1", "train.epochs=1.5", "train.deterministic=true",
         "optim.warmup_epochs=0.1", "early_stop.after_epoch=null", "train.tensorboard=false"]


def env(threads=2):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads))
    e.pop("TRAIN_STATUS_FILE", None)
    return e


def run_sh(*args, timeout=600, check=True):
    p = subprocess.run([RUN_SH, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"run.sh {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def records(run, kind):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# ---- the demo recipe ------------------------------------------------------------------------------------
# Chance is 1/20 = 0.05. The fixture trains 2 epochs on 80 crops of the 180 pictures (the recipe's 5 epochs
# on pictures resized to 96 reach 1.00: BENCHMARKS.md); earlier such runs reached 0.84 after epoch 1.
DEMO_MIN_PRODUCT_ACC = 0.6


def test_demo_recipe_learns_the_generated_data(trained_demo):
    """``trained_demo`` (conftest) ran ``train/run.sh demo`` (``DEMO_FIXTURE``: 2 epochs, no resize) on the
    2,000-product set; the predictor's tests use the same run."""
    run, stdout, demo_data_dir = trained_demo["run"], trained_demo["stdout"], trained_demo["data"]
    val = records(run, "val")
    assert val, stdout
    final = val[-1]
    assert final["product_acc"] >= DEMO_MIN_PRODUCT_ACC, stdout
    assert final["image_acc"] >= DEMO_MIN_PRODUCT_ACC - 0.1
    manifest = json.load(open(os.path.join(demo_data_dir, "manifest.json")))["splits"]["val"]
    assert (final["images"], final["products"]) == (manifest["images"], manifest["products"])
    for name in ("last.pt", "best.pt", "metrics.jsonl", "curves.png", "config.yaml"):
        assert (run / name).stat().st_size > 0, name
    assert open(run / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    last = checkpoint.load(str(run / "last.pt"))
    best = checkpoint.load(str(run / "best.pt"))
    assert last["status"] == "finished" and last["step"] == round(last["config"]["train"]["epochs"] * last["steps_per_epoch"])
    assert best["best"]["metric"] == max(v["product_acc"] for v in val)
    assert len(last["category_ids"]) == 20 and last["config"]["model"]["name"] == "tiny"
    train = records(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(0 <= r["data_wait"] < 1 and r["images_per_s"] > 0 for r in train)
    # the progress line as the user sees it
    assert "img/s data" in stdout and "eta" in stdout
    # a second run of the same command finds the run done
    again = run_sh("demo", "--data", demo_data_dir, "--out", run, *DEMO_FIXTURE)
    assert "already done" in again.stdout


# ---- resume ---------------------------------------------------------------------------------------------
def _last_step(run):
    try:
        return checkpoint.load(os.path.join(run, "last.pt"))["step"]
    except checkpoint.CheckpointError:
        return -1


def _start(args, prefix=()):
    return subprocess.Popen([*prefix, RUN_SH, *map(str, args)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


# run.sh as PID 1 of a PID namespace of its own, as in a container: there a signal without a handler is
# ignored (docker stop would wait out its grace period and SIGKILL). Needs root and util-linux's unshare.
AS_PID_1 = ("unshare", "--pid", "--fork", "--mount-proc")


def _can_run_as_pid_1():
    try:
        return subprocess.run([*AS_PID_1, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _wait_for(proc, run, min_logged_step, after_ckpt_step=0, timeout=300):
    """Until metrics.jsonl shows ``min_logged_step`` and last.pt is at or past ``after_ckpt_step``."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the run ended too early:\n" + proc.stdout.read()
        assert time.time() < deadline, "the run never got far enough"
        logged = [r["step"] for r in records(run, "train")] if os.path.exists(run / "metrics.jsonl") else []
        if logged and max(logged) >= min_logged_step and _last_step(run) >= after_ckpt_step:
            return
        time.sleep(0.05)


def _run_and_kill(args, run, after_ckpt_step, min_logged_step, timeout=300):
    """Start run.sh; SIGKILL its whole process group once last.pt is at or past ``after_ckpt_step`` and
    metrics.jsonl shows ``min_logged_step`` (steps after that checkpoint that the resumed run must redo)."""
    proc = _start(args)
    try:
        _wait_for(proc, run, min_logged_step, after_ckpt_step, timeout)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


RESUME_ARGS = [*SMALL, "train.log_every=1", "train.ckpt_every_steps=10"]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The uninterrupted run that the interrupted ones must end equal to."""
    full = tmp_path_factory.mktemp("reference") / "full"
    run_sh("demo", "--out", full, "--data", data_dir, *RESUME_ARGS)
    ref = checkpoint.load(str(full / "last.pt"))
    assert ref["step"] == round(1.5 * ref["steps_per_epoch"]) and ref["step"] % ref["steps_per_epoch"]  # mid-epoch
    return full, ref


def _assert_equal_to_reference(run, reference_run):
    full, ref = reference_run
    got = checkpoint.load(str(run / "last.pt"))
    assert got["step"] == ref["step"] and got["status"] == "finished"
    for key, value in ref["model"].items():
        assert torch.equal(got["model"][key], value), key
    for pid, st in ref["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(got["optimizer"]["state"][pid][k], v), (pid, k)
    # the log of the resumed run has each step once, as the uninterrupted one
    steps = [r["step"] for r in records(run, "train")]
    assert steps == sorted(set(steps)) == [r["step"] for r in records(full, "train")]
    assert records(run, "val")[-1]["product_acc"] == records(full, "val")[-1]["product_acc"]


def test_sigkilled_run_resumes_bit_exact(data_dir, tmp_path, reference_run):
    common = ["--data", data_dir, *RESUME_ARGS]
    spe, total = reference_run[1]["steps_per_epoch"], reference_run[1]["step"]

    run = tmp_path / "killed"
    args = ["demo", "--out", run, *common]
    _run_and_kill(args, run, after_ckpt_step=10, min_logged_step=13)  # killed mid-epoch 1, 3+ steps past last.pt
    first = _last_step(run)
    assert 0 < first < spe
    _run_and_kill(args, run, after_ckpt_step=spe + 1, min_logged_step=spe + 3)  # again in epoch 2
    assert spe < _last_step(run) < total
    p = run_sh(*args)
    assert p.stdout.startswith("resuming at step") or "resuming at step" in p.stdout
    _assert_equal_to_reference(run, reference_run)

    # The same RUN with another model: refused, naming both.
    p = run_sh(*args, "model.name=resnet10t", check=False)
    assert p.returncode == 2
    assert "holds model tiny" in p.stderr + p.stdout and "resnet10t" in p.stderr + p.stdout


def test_resume_across_loader_graphs(data_dir, tmp_path):
    """A reader position fits only the DALI graph it was taken from. A re-repack that records (or drops) the
    picture sizes switches the CPU loader between the window-decode graph and the size-check graph: from an
    epoch-end checkpoint the run goes on with fresh readers (a note says so); mid-epoch it is refused, naming
    both graphs."""
    import shutil

    data = tmp_path / "DATA"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())

    def picture_sizes(keep: bool) -> None:
        m = json.loads(json.dumps(manifest))
        for split in m["splits"].values():
            if not keep:
                split.pop("picture_sizes")
        (data / "manifest.json").write_text(json.dumps(m))

    run = tmp_path / "RUN"
    common = ["demo", "--data", data, "--out", run, *SMALL, "data.image_size=180"]
    picture_sizes(False)
    run_sh(*common, "train.epochs=1")  # ends at the epoch end, size-check graph
    ck = checkpoint.load(str(run / "last.pt"))
    spe = ck["steps_per_epoch"]
    # (and a resumed model normalizes as its checkpoint says: here other values than the trunk's)
    assert ck["input_norm"]["std"] != [0.5, 0.5, 0.5]
    ck["input_norm"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    checkpoint.save(ck, str(run / "last.pt"))
    picture_sizes(True)
    p = run_sh(*common, "train.epochs=1.5")  # window-decode graph, ends mid-epoch 2
    assert "does not fit this loader" in p.stdout and "fresh readers" in p.stdout, p.stdout + p.stderr
    # the note names what differs; the loader's own advice (start without a state) is what the run just did
    assert "graph: saved 'size-check', now 'window-decode'" in p.stdout and "afresh" not in p.stdout, p.stdout
    ck = checkpoint.load(str(run / "last.pt"))
    assert ck["step"] == round(1.5 * spe) and ck["loader_states"][0]["graph"] == "window-decode"
    assert ck["input_norm"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    picture_sizes(False)
    p = run_sh(*common, "train.epochs=2", check=False)
    assert p.returncode == 2
    assert "graph: saved 'window-decode', now 'size-check'" in p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr, p.stderr  # the refusal, not buried
    assert "stopped mid-epoch" in p.stderr and f"train.init_from={run / 'last.pt'}" in p.stderr, p.stderr
    assert checkpoint.load(str(run / "last.pt"))["step"] == round(1.5 * spe)  # nothing lost


def _workers(launcher_pid):
    """The trainer processes under run.sh ``launcher_pid``: torchrun's children."""
    tree = process_tree(launcher_pid)
    torchrun = [p for p in tree[1:] if _parent(p) == launcher_pid]
    return [p for p in tree if torchrun and _parent(p) == torchrun[0]]


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _stop_with(args, run, min_logged_step, sig, target):
    """Start run.sh, send ``sig`` to ``target`` (run.sh, run.sh as PID 1, its torchrun, the workers or rank 1)
    once metrics.jsonl shows ``min_logged_step``: the run writes last.pt at the step it stopped after and exits
    5. Returns that step and the output."""
    proc = _start(args, AS_PID_1 if target == "run.sh as PID 1" else ())
    try:
        _wait_for(proc, run, min_logged_step)
        run_sh_pid = proc.pid if target != "run.sh as PID 1" else process_tree(proc.pid)[1]
        workers = _workers(run_sh_pid)
        pids = {"torchrun": [_parent(w) for w in workers][:1], "workers": workers,
                "rank 1": [w for w in workers if _rank(w) == 1]}.get(target, [run_sh_pid])
        assert pids, target
        for pid in pids:
            os.kill(pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 5, out
    stopped = records(run, "event")[-1]
    ck = checkpoint.load(str(run / "last.pt"))
    assert stopped["event"] == "stopped" and stopped["signal"] == signal.Signals(sig).name, out
    # last.pt holds the step it stopped after, the last one logged
    assert ck["step"] == stopped["step"] == records(run, "train")[-1]["step"] >= min_logged_step, out
    assert ck["status"] == "running"
    assert f"stopped by {signal.Signals(sig).name} at step {ck['step']}" in out
    assert "Traceback" not in out or target == "torchrun", out  # torchrun alone reports its own signal
    return ck["step"], out


def test_signalled_run_checkpoints_exits_5_and_resumes_bit_exact(data_dir, tmp_path, reference_run):
    """SIGTERM to run.sh (as a container's PID 1 where this machine can), SIGUSR1 to torchrun alone, SIGTERM
    to the worker: each time the run stops after a step, with that step in last.pt and exit status 5; the same
    command resumes it, and it ends equal to the uninterrupted run."""
    spe = reference_run[1]["steps_per_epoch"]
    run = tmp_path / "RUN"
    args = ["demo", "--out", run, "--data", data_dir, *RESUME_ARGS]
    first, _ = _stop_with(args, run, 5, signal.SIGTERM, "run.sh as PID 1" if _can_run_as_pid_1() else "run.sh")
    assert first < spe  # mid-epoch 1
    second, _ = _stop_with(args, run, spe + 3, signal.SIGUSR1, "torchrun")
    third, _ = _stop_with(args, run, second + 3, signal.SIGTERM, "workers")
    assert spe < second < third < reference_run[1]["step"]
    run_sh(*args)
    _assert_equal_to_reference(run, reference_run)


def _rank(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return int(dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)[b"RANK"])


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_one_run_per_run_dir_and_workers_die_with_their_launcher(data_dir, tmp_path):
    """Two processes. A second start on a RUN that a live run holds exits 2 at once, naming the holder, and
    touches nothing (an unfinished checkpoint write it would clean up stays); after a kill -9 of the first
    run's process group no worker is left within 10 s, and its lock does not block the next start; SIGTERM to
    rank 1 alone stops both ranks after the same step, with that step in last.pt."""
    import socket

    from train.train import Trainer

    run = tmp_path / "RUN"
    args = ["demo", "--out", run, "--data", data_dir, "--nproc", "2", *SMALL, "train.epochs=1000",
            "train.log_every=1", "train.ckpt_every_steps=2"]
    first = _start(args)
    try:
        _wait_for(first, run, 3, after_ckpt_step=2)
        workers = _workers(first.pid)
        assert len(workers) == 2
        stale = run / ".last.pt.unfinished.tmp"  # what the trainer removes when it starts
        stale.write_bytes(b"x")
        config_mtime = (run / "config.yaml").stat().st_mtime_ns
        t0 = time.time()
        second = run_sh(*args, check=False, timeout=120)
        assert second.returncode == 2 and time.time() - t0 < 60, second.stdout + second.stderr
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error: ") and second.stdout == "", line
        holder = _parent(workers[0])  # the lock is torchrun's
        assert f"pid {holder} on host {socket.gethostname()}" in line and "in use by a live run" in line, line
        assert stale.exists() and (run / "config.yaml").stat().st_mtime_ns == config_mtime
        tree = process_tree(first.pid)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        first.stdout.close()
    deadline = time.time() + 10
    while any(map(_alive, tree)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if _alive(p)], "processes of the killed run live on"

    # the dead run's lock does not block; a stop signal to one rank stops both after the same step. The killed
    # run may have logged steps past its last checkpoint: wait for steps that only the new run can log.
    resumed_from = _last_step(run)
    logged = max(r["step"] for r in records(run, "train"))
    step, out = _stop_with(args, run, max(resumed_from, logged) + 2, signal.SIGTERM, "rank 1")
    assert f"resuming at step {resumed_from}" in out
    assert step % Trainer.STOP_CHECK_EVERY == 0 and step > resumed_from
    assert not stale.exists()  # removed by the run that started


# ---- DDP ------------------------------------------------------------------------------------------------
# Runs the real Trainer under torchrun and records what each rank trained on. With crop = image size the
# "random crop" is the whole image, and a flip does not change a picture's pixel sum, so the sum identifies
# the sample.
_PROBE = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from train.config import load_config
    from train.distributed import cleanup, setup
    from train.train import Trainer
    data, run, out, *overrides = sys.argv[1:]
    cfg = load_config("demo", overrides)
    cfg.data.path = data
    d = setup()
    tr = Trainer(cfg, run, d)
    seen = []
    step = tr.train_step
    def recording_step(images, labels):
        seen.append([round(v, 2) for v in images.double().flatten(1).sum(1).tolist()])
        return step(images, labels)
    tr.train_step = recording_step
    init = torch.cat([p.detach().flatten().clone() for p in tr.raw.parameters()])
    rc = tr.fit()
    flat = torch.cat([p.detach().flatten() for p in tr.raw.parameters()])
    every = [torch.empty_like(flat) for _ in range(d.world_size)]
    dist.all_gather(every, flat)
    seen_all = [None] * d.world_size
    dist.all_gather_object(seen_all, seen)
    if d.rank == 0:
        json.dump({"rc": rc, "params_equal": all(torch.equal(every[0], p) for p in every),
                   "changed": float((every[0] - init).abs().max()), "seen": seen_all}, open(out, "w"))
    tr.close()
    cleanup()
""")


def test_ddp_two_processes_disjoint_data_identical_parameters(data_dir, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    out, run = tmp_path / "ddp.json", tmp_path / "run"
    steps, batch = 6, 4
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(probe), str(data_dir), str(run), str(out), "data.image_size=180", "data.crop=180", f"data.batch_size={batch}",
                        "data.num_threads=1", f"train.max_steps={steps}", "train.log_every=1",
                        "train.ckpt_every_steps=3", "train.tensorboard=false", "early_stop.after_epoch=null"],
                       cwd=ROOT, env=env(threads=1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.load(open(out))
    assert r["rc"] == 0
    assert r["params_equal"] and r["changed"] > 0  # trained, and the same on both ranks, bit for bit
    rank0, rank1 = ([v for batch_ in s for v in batch_] for s in r["seen"])
    assert len(rank0) == len(rank1) == steps * batch
    assert len(set(rank0)) == len(rank0) and len(set(rank1)) == len(rank1)
    assert not set(rank0) & set(rank1), "the ranks trained on the same images"
    # only rank 0 prints: one progress line per step
    assert sum(line.startswith("epoch ") for line in p.stdout.splitlines()) == steps
    # validation counted every val image and product once, though the ranks split the val split between them
    val = records(run, "val")[-1]
    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))["splits"]["val"]
    assert (val["images"], val["products"]) == (manifest["images"], manifest["products"])
    ck = checkpoint.load(str(run / "last.pt"))
    assert ck["world_size"] == 2 and len(ck["loader_states"]) == len(ck["rng"]) == 2
    assert [s["rank"] for s in ck["loader_states"]] == [0, 1]


# ---- early stop, non-finite loss ------------------------------------------------------------------------
def test_early_stop_rule_and_nonfinite_loss_end_the_run(data_dir, tmp_path):
    run = tmp_path / "stop"
    p = run_sh("demo", "--data", data_dir, "--out", run, *SMALL, "train.val_every_steps=4",
               "early_stop.after_epoch=0.05", "early_stop.min_val_acc=1.01", check=False)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "early stop: val product_acc" in p.stdout and "not going anywhere" in p.stdout
    assert "Traceback" not in p.stderr  # a designed end, not a crash
    assert checkpoint.load(str(run / "last.pt"))["status"] == "early_stopped"
    assert records(run, "event")[-1]["event"] == "early_stop"
    assert (run / "curves.png").exists()
    p = run_sh("demo", "--data", data_dir, "--out", run, *SMALL, "train.val_every_steps=4",
               "early_stop.after_epoch=0.05", "early_stop.min_val_acc=1.01", check=False)
    assert p.returncode == 3 and "stopped early" in p.stdout

    run = tmp_path / "nan"
    p = subprocess.run([sys.executable, "-m", "train.train", "--config", "demo", "--data", str(data_dir), "--out",
                        str(run), *SMALL, "optim.lr_schedule=[[0, 1.0e+30]]", "train.log_every=1"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "the loss is not finite at step" in p.stderr
    assert not (run / "last.pt").exists()  # nothing written after the loss went bad


# ---- fine-tuning from a checkpoint ----------------------------------------------------------------------
def _seed_checkpoint(data_dir, path):
    """A fresh tiny model of DATA's class map, saved as a seed run's checkpoint (step 7)."""
    import csv

    from models import create_model

    with open(os.path.join(data_dir, "classes.csv")) as f:
        category_ids = [int(r["category_id"]) for r in csv.DictReader(f)]
    torch.manual_seed(0)
    seed = create_model("tiny", len(category_ids), head="first")
    checkpoint.save({"format": checkpoint.FORMAT, "model": seed.state_dict(), "model_name": "tiny",
                     "num_classes": len(category_ids), "category_ids": category_ids, "step": 7,
                     "config": {"model": {"head": "first"}}, "best": {"metric": 0.5, "step": 7},
                     "input_norm": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}, path)
    return seed, category_ids


def test_finetune_on_tiled_products_starts_from_init_checkpoint(data_dir, tmp_path):
    init = str(tmp_path / "seed.pt")
    seed, category_ids = _seed_checkpoint(data_dir, init)
    common = ["--data", data_dir, "model.name=tiny", "data.crop=64", "data.batch_size=4", "data.num_threads=1",
              "train.max_steps=2", "train.amp=off", "train.tensorboard=false"]
    run = tmp_path / "k2"
    p = run_sh("finetune_k2", "--out", run, *common, f"train.init_from={init}")
    assert f"init_from {init}: model weights of step 7" in p.stdout
    ck = checkpoint.load(str(run / "last.pt"))
    assert ck["step"] == 2 and ck["config"]["data"]["tiled_k"] == 2
    assert ck["input_norm"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # the seed's, not the trunk's
    moved = [k for k, v in seed.state_dict().items() if v.is_floating_point() and not torch.equal(ck["model"][k], v)]
    assert moved and len(moved) < len(seed.state_dict())  # trained from the seed weights, not from scratch ...
    assert torch.allclose(ck["model"]["fc.weight"], seed.state_dict()["fc.weight"], atol=1e-3)  # ... at lr 5e-5

    # a seed checkpoint of another class map is refused
    checkpoint.save({**checkpoint.load(init), "category_ids": category_ids[::-1]}, init)
    p = run_sh("finetune_k2", "--out", tmp_path / "refused", *common, f"train.init_from={init}", check=False)
    assert p.returncode == 2 and "class map differs" in p.stderr


def test_upsized_finetune_trains_on_the_single_image_products_enlarged(data_dir, tmp_path):
    """finetune_k1_224 (its sizes kept, a tiny model): one epoch is the products/k1 train records, each
    picture resized from 180 to 224 and cut to 200."""
    from dali_pipes.dataset import open_dataset

    init = str(tmp_path / "seed.pt")
    _seed_checkpoint(data_dir, init)
    run = tmp_path / "k1"
    run_sh("finetune_k1_224", "--out", run, "--data", data_dir, "model.name=tiny", "model.compile=false",
           "data.backend=dali-cpu", "data.batch_size=4", "data.num_threads=1", "train.max_steps=1", "train.amp=off",
           "train.tensorboard=false", f"train.init_from={init}")
    ck = checkpoint.load(str(run / "last.pt"))
    ds = open_dataset(str(data_dir))
    assert ck["steps_per_epoch"] == ds.num_records("train", 1) // 4 < ds.num_records("train") // 4
    assert {k: ck["config"]["data"][k] for k in ("tiled_k", "image_size", "crop")} == \
        {"tiled_k": 1, "image_size": 224, "crop": 200}



def test_tensorboard_after_kills_shows_each_step_once(data_dir, tmp_path):
    """TensorBoard (installed by `make test`) is on by default. A run SIGKILLed twice and resumed shows each
    logged step once there, the same steps as metrics.jsonl: whatever the checkpoint holds is on disk in the
    event files too, and the resumed run purges what came after it."""
    run = tmp_path / "RUN"
    args = ["demo", "--data", data_dir, "--out", run, *SMALL, "train.tensorboard=true", "train.log_every=1",
            "train.ckpt_every_steps=10"]
    _run_and_kill(args, run, after_ckpt_step=10, min_logged_step=10)
    spe = checkpoint.load(str(run / "last.pt"))["steps_per_epoch"]
    _run_and_kill(args, run, after_ckpt_step=spe + 1, min_logged_step=spe + 1)
    run_sh(*args)
    steps = [r["step"] for r in records(run, "train")]
    assert steps == sorted(set(steps)) and len(steps) == round(1.5 * spe)
    assert tb_steps(run / "tb") == steps
    assert tb_steps(run / "tb", "val/product_acc") == [r["step"] for r in records(run, "val")]
