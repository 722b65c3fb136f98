"""The trainer's distributed edge cases and the settings around them, on 1-2 gloo processes (CPU):

- a resume with another process count (at an epoch end) keeps metrics.jsonl whole, in one step unit, and
  converts the best step; a mid-epoch checkpoint refuses another process count or batch size;
- the exit status reaches run.sh even when torchrun ends rank 0 during its teardown, and the first status
  reported stays (an error, not the lost contact it causes on the other ranks);
- a trainer started without run.sh takes RUN/.lock itself; a stop signal during a validation stops the run
  after it;
- WORLD_SIZE without LOCAL_RANK is refused; sync_bn + compile + DDP is refused;
- fp16 without grad_clip works on a torch without ``get_total_norm``; ``optim.*_lr_mult`` scale the updates.
"""
import json
import signal
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import tb_steps
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "train", "run.sh")
SMALL = ["data.crop=64", "data.batch_size=32", "data.num_threads=1", "train.deterministic=true",
         "optim.warmup_epochs=0", "early_stop.after_epoch=null", "train.tensorboard=false", "train.log_every=4",
         "train.ckpt_every_steps=0", "train.val_every_steps=0"]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    for k in ("TRAIN_STATUS_FILE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if k not in extra:
            e.pop(k, None)
    return e


def run_sh(*args, check=True):
    p = subprocess.run([RUN_SH, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"run.sh {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def records(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_with_another_process_count(data_dir, tmp_path):
    run = tmp_path / "RUN"
    common = ["demo", "--data", data_dir, "--out", run, *SMALL, "train.tensorboard=true"]
    # 1 process: stop mid-epoch 1 (max_steps), then finish epoch 1
    run_sh(*common, "--nproc", "1", "train.epochs=2", "train.max_steps=5")
    ck = checkpoint.load(str(run / "last.pt"))
    spe1 = ck["steps_per_epoch"]
    assert ck["step"] == 5 < spe1
    # mid-epoch: another process count or another batch size cannot take over the reader positions
    for extra in (["--nproc", "2"], ["data.batch_size=16"]):
        p = run_sh(*common, *extra, "train.epochs=2", check=False)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "stopped mid-epoch (step 5)" in p.stderr and "--nproc 1" in p.stderr, p.stderr
        assert checkpoint.load(str(run / "last.pt"))["step"] == 5
    run_sh(*common, "--nproc", "1", "train.epochs=2", f"train.max_steps={spe1}")
    one = records(run)
    val1 = [r for r in one if r["kind"] == "val"]  # at the max_steps stop, and at the epoch end
    assert [r["step"] for r in val1] == [5, spe1] and val1[1]["epoch"] == 1.0

    # 2 processes from the epoch end: the same epochs in steps of the new size
    p = run_sh(*common, "--nproc", "2", "train.epochs=2")
    assert "1 -> 2 processes" in p.stdout, p.stdout
    ck = checkpoint.load(str(run / "last.pt"))
    spe2 = ck["steps_per_epoch"]
    n = json.load(open(os.path.join(data_dir, "manifest.json")))["splits"]["train"]["images"]
    assert (spe1, spe2) == (n // 32, n // 2 // 32) and ck["world_size"] == 2
    assert ck["step"] == 2 * spe2 and ck["status"] == "finished"
    recs = records(run)
    val = [r for r in recs if r["kind"] == "val"]
    # the validations of the 1-process part are still there, at their steps in the new unit ...
    assert [r["epoch"] for r in val] == [val1[0]["epoch"], 1.0, 2.0]
    assert [r["step"] for r in val] == [round(5 * spe2 / spe1), spe2, 2 * spe2]
    assert [r["product_acc"] for r in val[:2]] == [r["product_acc"] for r in val1]
    # ... and every record's step is in the new unit: step / spe2 is its epoch (train records of the first
    # part were logged every 4 of its steps, so they round to the nearest new step; epochs are written with 4
    # decimals)
    for r in recs:
        if "epoch" in r:
            assert abs(r["step"] / spe2 - r["epoch"]) <= 0.5 / spe2 + 1e-4, r
    # in order, and no record twice (two old steps may round to one new step: epochs tell them apart)
    train = [(r["step"], r["epoch"]) for r in recs if r["kind"] == "train"]
    assert train == sorted(train) and len(train) == len({e for _, e in train})
    best = ck["best"]
    assert best["step"] in (spe2, 2 * spe2) and best["metric"] == max(r["product_acc"] for r in val)
    # TensorBoard cannot rewrite its event files: the 1-process part stays in RUN/tb in its own steps, the
    # rest goes on in a directory named for the new unit
    new_tb = f"tb_from_epoch1_{spe2}spe"
    assert f"TensorBoard goes on in RUN/{new_tb}" in p.stdout, p.stdout
    assert tb_steps(run / "tb", "val/product_acc") == [5, spe1]
    assert tb_steps(run / new_tb, "val/product_acc") == [2 * spe2]
    assert min(tb_steps(run / new_tb)) > spe2 and max(tb_steps(run / "tb")) <= spe1


# Rank 0 lingers in its teardown, as a slow destroy_process_group can: torchrun ends it once rank 1 exits.
_SLOW_TEARDOWN = textwrap.dedent("""
    import os, sys, time
    import train.train as tt
    real = tt.cleanup
    def slow_cleanup():
        if os.environ["RANK"] == "0":
            time.sleep(5)
        real()
    tt.cleanup = slow_cleanup
    sys.exit(tt._exit_status(tt.main(sys.argv[1:])))
""")


def test_exit_status_survives_a_slow_rank_0_teardown(data_dir, tmp_path):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint" * 64)  # refused by every rank: status 2
    probe = tmp_path / "probe.py"
    probe.write_text(_SLOW_TEARDOWN)
    status = tmp_path / "status"
    status.write_text("")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(probe), "--config", "demo", "--data", str(data_dir), "--out", str(run), *SMALL],
                       cwd=ROOT, env=env(TRAIN_STATUS_FILE=str(status)), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert status.read_text() == "2", p.stdout + p.stderr


def test_the_first_status_reported_stays(tmp_path, monkeypatch):
    """An error on one rank (1) makes the others lose contact (4) after it: run.sh returns the cause."""
    from train.train import EXIT_ERROR, EXIT_LOST_CONTACT, report_status

    status = tmp_path / "status"
    status.write_text("")  # as run.sh's mktemp leaves it
    monkeypatch.setenv("TRAIN_STATUS_FILE", str(status))
    report_status(EXIT_ERROR)
    report_status(EXIT_LOST_CONTACT)
    assert status.read_text() == "1"


def test_world_size_without_local_rank_is_refused(data_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "train.train", "--config", "demo", "--data", str(data_dir), "--out",
                        str(tmp_path / "RUN"), *SMALL], cwd=ROOT, env=env(WORLD_SIZE="2", RANK="0"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "WORLD_SIZE=2 but LOCAL_RANK not set" in p.stderr and "torchrun" in p.stderr
    assert "Traceback" not in p.stderr


# ---- in-process trainers on the synthetic backend --------------------------------------------------------
def _cfg(tmp_path, **sections):
    from train.config import from_dict

    values = {"data": {"backend": "synthetic", "batch_size": 4, "crop": 32, "image_size": 32,
                       "synthetic_num_classes": 5, "synthetic_steps": 4},
              "model": {"name": "tiny", "channels_last": False},
              "train": {"amp": "off", "tensorboard": False, "log_every": 1000, "epochs": 1}}
    for k, v in sections.items():
        values.setdefault(k, {}).update(v)
    cfg = from_dict(values)
    cfg.validate()
    return cfg


def test_sync_bn_with_compile_on_several_processes_is_refused(tmp_path):
    from train.config import ConfigError
    from train.distributed import Dist
    from train.train import Trainer

    cfg = _cfg(tmp_path, model={"sync_bn": True, "compile": True})
    with pytest.raises(ConfigError, match="model.sync_bn=true with model.compile=true"):
        Trainer(cfg, str(tmp_path / "RUN"), Dist(rank=0, world_size=2))  # refused before any collective
    assert not (tmp_path / "RUN").exists()


def test_a_trainer_started_without_run_sh_takes_the_run_lock(tmp_path, monkeypatch):
    """Without train/run.sh (python -m train.train, or c10d nodes) rank 0 takes RUN/.lock itself: refused while
    another process holds it, before anything in RUN is touched; a released lock does not block."""
    from train.launch import LOCK_ENV, RunInUse, hold_run_lock
    from train.distributed import Dist
    from train.train import Trainer

    monkeypatch.delenv(LOCK_ENV, raising=False)
    run = tmp_path / "RUN"
    held = hold_run_lock(str(run))  # another run (flock: another open file, even in this process)
    stale = run / ".last.pt.abcd.tmp"  # an unfinished checkpoint write, which a starting trainer removes
    stale.write_bytes(b"x")
    with pytest.raises(RunInUse, match=rf"in use by a live run: pid {os.getpid()} on host "):
        Trainer(_cfg(tmp_path), str(run), Dist())
    assert stale.exists() and sorted(os.listdir(run)) == [".last.pt.abcd.tmp", ".lock"]
    os.close(held)  # the holder ends
    tr = Trainer(_cfg(tmp_path), str(run), Dist())
    assert not stale.exists()
    with pytest.raises(RunInUse):  # held by this trainer now
        hold_run_lock(str(run))
    tr.close()


def test_a_signal_during_validation_stops_the_run_after_it(tmp_path, monkeypatch):
    """SIGTERM while a validation runs (noted as the handler notes it): the validation ends, the step's
    checkpoint is the stop's (written once), and fit returns 5 at that step."""
    import signal

    from train import distributed
    from train.distributed import Dist
    from train.train import EXIT_STOPPED, Trainer

    monkeypatch.setattr(distributed, "_caught", 0)
    tr = Trainer(_cfg(tmp_path, train={"val_every_steps": 3, "ckpt_every_steps": 0}), str(tmp_path / "RUN"), Dist())
    validated, saved = [], []
    tr.validate = lambda: (validated.append(tr.step), distributed._note(signal.SIGTERM, None), None)[-1]
    real_save = tr.save
    tr.save = lambda *a, **k: (saved.append(tr.step), real_save(*a, **k))
    assert tr.fit() == EXIT_STOPPED
    assert validated == [3] and saved == [3] and tr.step == 3
    assert checkpoint.load(str(tmp_path / "RUN" / "last.pt"))["step"] == 3
    tr.close()


def test_fp16_without_clip_on_a_torch_without_get_total_norm(tmp_path, monkeypatch):
    from train.distributed import Dist
    from train.train import Trainer, total_norm

    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    assert float(total_norm(grads)) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    tr = Trainer(_cfg(tmp_path, train={"amp": "fp16", "epochs": 5}), str(tmp_path / "RUN"), Dist())
    scale0 = tr.scaler.get_scale()
    done = tr.run_steps(10, housekeeping=False)
    assert done.steps == 10 and tr.step == 10
    # the steps the trainer counted as skipped (non-finite total_norm) are the ones the scaler skipped: each
    # halved its scale (and no 2,000 good steps in a row doubled it)
    skipped = int(tr.acc_skipped)
    assert tr.scaler.get_scale() == scale0 / 2 ** skipped and skipped < 10
    tr.close()


def test_lr_multipliers_scale_each_groups_first_adam_update(tmp_path):
    from models import param_groups
    from train.distributed import Dist
    from train.train import Trainer

    lr = 1e-3
    cfg = _cfg(tmp_path, optim={"lr_schedule": [[0, lr]], "pretrained_lr_mult": 0.1, "new_lr_mult": 3.0,
                                "eps": 1e-12, "fused": False})
    tr = Trainer(cfg, str(tmp_path / "RUN"), Dist())
    groups = param_groups(tr.raw)
    before = {id(p): p.detach().clone() for p in tr.raw.parameters()}
    tr.run_steps(1, housekeeping=False)
    # Adam's first step moves every parameter with a non-zero gradient by exactly lr * mult
    for name, mult in (("pretrained", 0.1), ("new", 3.0)):
        moves = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in groups[name]])
        moves = moves[moves > 0]
        assert moves.numel() > 0, name
        assert torch.allclose(moves, torch.full_like(moves, lr * mult), rtol=1e-3), (name, moves.min(), moves.max())
    tr.close()


def test_a_worker_whose_launcher_died_during_its_start_up_kills_itself():
    """train.launch exports its pid (torchrun keeps it): a worker whose parent is no longer that process
    when it asks to die with it (torchrun gone while the worker imported torch) ends at once."""
    code = ("import os; from train.distributed import die_with_launcher; die_with_launcher(); "
            "print('alive', os.environ.get('TRAIN_LAUNCHER_PID'))")  # not passed on to what the worker starts
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TORCHELASTIC_RUN_ID="test")
    for launcher, alive in ((os.getpid(), True), (os.getpid() + 10_000_000, False)):
        env["TRAIN_LAUNCHER_PID"] = str(launcher)
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout.strip()) == ((0, "alive None") if alive else (-signal.SIGKILL, "")), p.stderr
