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
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this trainer: a damaged or truncated"):
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


def test_a_file_that_is_no_checkpoint_is_named_so_without_torchs_advice(tmp_path):
    """Garbage bytes, an empty file, a pickled module, a dict without our fields: each is 'not a checkpoint of
    this trainer', with what to pass instead, never torch's advice to load with weights_only=False."""
    files = {"garbage.pt": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    expect = {"garbage.pt": "not a torch file", "empty.pt": "the file is empty",
              "module.pt": "holds Python objects", "foreign.pt": "without its fields"}
    for name, what in expect.items():
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(str(tmp_path / name))
        msg = str(e.value)
        assert f"{name} is not a checkpoint of this trainer" in msg and what in msg and "RUN/best.pt" in msg
        assert "weights_only" not in msg
    # What a user of predict sees: one line, exit 2, nothing from torch.
    p = subprocess.run([sys.executable, "-m", "tools.predict", "--bson", str(tmp_path / "test.bson"),
                        "--checkpoint", str(tmp_path / "garbage.pt"), "--out", str(tmp_path / "sub.csv")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"predict: error: {tmp_path / 'garbage.pt'} is not a checkpoint of this trainer: not a torch file at all. "
        "Pass RUN/best.pt or RUN/last.pt written by train/run.sh (a damaged RUN/last.pt: delete it, and the run "
        "starts over)"]


def test_checkpoint_of_an_older_version_with_data_normalization_keys_loads(tmp_path):
    """Checkpoints written when the loader normalized (data.dtype, channels_last, mean, std) still load: those
    keys are dropped, and the data section builds a DataConfig again."""
    from dali_pipes.config import DataConfig
    from train.config import from_dict

    old_data = {"path": "DATA", "backend": "dali-cpu", "batch_size": 8, "crop": 80, "dtype": "float32",
                "channels_last": False, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    path = str(tmp_path / "old.pt")
    checkpoint.save({"format": checkpoint.FORMAT, "model": {"w": torch.ones(2)}, "config": {"data": old_data}}, path)
    ck = checkpoint.load(path)
    assert ck["config"]["data"] == {"path": "DATA", "backend": "dali-cpu", "batch_size": 8, "crop": 80}
    assert DataConfig(**ck["config"]["data"]).crop == 80
    assert from_dict({"data": ck["config"]["data"]}).data.batch_size == 8
    # its weights saw pixels normalized with those values (pixel levels): the model is given them, 0..1 scale
    assert ck["input_norm"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert ck["input_norm"]["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_a_model_normalizes_as_its_checkpoint_says():
    """An Inception-style trunk normalizes with 0.5/0.5; weights trained with other values (an older checkpoint's
    data.mean/std, or any checkpoint's input_norm) get those values back."""
    from models import create_model

    model = create_model("tiny", 4)
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    default = model.input_norm()
    checkpoint.apply_input_norm({"input_norm": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}, model)
    want = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.allclose(model.prepare_input(x).float(), want, atol=1e-5)
    assert model.input_norm() == {"mean": [0.5] * 3, "std": [0.5] * 3} != default
    checkpoint.apply_input_norm({}, model)  # a checkpoint without the field changes nothing
    assert model.input_norm()["mean"] == [0.5] * 3
    with pytest.raises(ValueError, match="3 means and 3 positive stds"):
        model.set_input_norm([0.5, 0.5], [0.5, 0.5, 0.5])
