"""Checkpoints: atomic writes survive a kill, weights_only loads, RNG states, refusals with clear messages."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from dali_pipes.dataset import DatasetError
from models import create_model
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes a first checkpoint, then a second one through a torch.save that stops halfway (as a kill during the
# write would leave it) and waits to be killed.
_WRITER = textwrap.dedent("""
    import io, sys, time, torch
    from train import checkpoint
    path = sys.argv[1]
    checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.ones(1000)}, "step": 1}, path)
    real_save = torch.save
    def half_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        open(path + ".writing", "w").close()
        time.sleep(120)
    torch.save = half_save
    checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.zeros(1000)}, "step": 2}, path)
""")


def test_kill_during_checkpoint_write_leaves_previous_last_loadable(tmp_path):
    path = str(tmp_path / "last.pt")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not os.path.exists(path + ".writing"):
            assert proc.poll() is None, "writer exited early"
            assert time.time() < deadline, "writer never reached the second save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    torn = [p for p in os.listdir(tmp_path) if checkpoint.TMP_SUFFIX in p]
    assert torn, "the interrupted write should have gone to a temporary file"
    ckpt = checkpoint.load(path)  # weights_only load of the previous, complete checkpoint
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(1000))
    assert checkpoint.remove_stale_temps(str(tmp_path)) and not [
        p for p in os.listdir(tmp_path) if checkpoint.TMP_SUFFIX in p]
    with pytest.raises(checkpoint.CheckpointError, match="not a loadable checkpoint"):
        torn_file = tmp_path / "torn.pt"
        torn_file.write_bytes(open(path, "rb").read()[:100])
        checkpoint.load(str(torn_file))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    dev = torch.device("cpu")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = checkpoint.rng_state(dev)
    path = str(tmp_path / "rng.pt")
    checkpoint.save({"format": checkpoint.FORMAT, "model": {}, "rng": [state]}, path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"][0], dev)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_checkpoint_of_another_model_or_class_map_is_refused():
    tiny = create_model("tiny", 5, head="first")
    ckpt = {"model_name": "tiny", "num_classes": 5, "config": {"model": {"head": "first"}},
            "model": tiny.state_dict(), "category_ids": [10, 11, 12, 13, 14]}
    checkpoint.check_model(ckpt, "RUN/last.pt", "tiny", "first", tiny)
    checkpoint.check_classes(ckpt, "RUN/last.pt", [10, 11, 12, 13, 14])
    with pytest.raises(checkpoint.CheckpointError, match=r"holds model tiny \(head first, 5 classes\), this run "
                                                          r"builds resnet10t"):
        checkpoint.check_model(ckpt, "RUN/last.pt", "resnet10t", "first", tiny)
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.check_model(ckpt, "RUN/last.pt", "tiny", "first", create_model("tiny", 6, head="first"))
    with pytest.raises(DatasetError, match="class map differs"):
        checkpoint.check_classes(ckpt, "RUN/last.pt", [10, 11, 12, 13, 15])
