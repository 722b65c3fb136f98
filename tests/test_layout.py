"""The two directions of the data path: the reading side opens and loads a DATA directory without the writer.

Run in a fresh interpreter where ``bson`` (pymongo) and ``dali_pipes.writer`` cannot be imported at all."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_READER = r"""
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("bson", "pymongo") or name.startswith("dali_pipes.writer"):
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _Refuse())
from dali_pipes.config import DataConfig
from dali_pipes.dataset import open_dataset
from dali_pipes.loader import build_loader
ds = open_dataset(sys.argv[1])
cfg = DataConfig(path=sys.argv[1], batch_size=8, num_threads=1)
loader, _ = build_loader(cfg, 0, 1, "val")
images, labels = next(iter(loader))[:2]
blocked = [m for m in sys.modules if m.split(".")[0] in ("bson", "pymongo") or m.startswith("dali_pipes.writer")]
print(ds.num_classes, tuple(images.shape), len(labels), blocked)
"""


def test_reading_side_needs_neither_writer_nor_pymongo(data_dir):
    r = subprocess.run([sys.executable, "-c", _READER, str(data_dir)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.strip().splitlines()[-1]
    assert out.startswith("8 ") and out.endswith(" []"), out


def test_blocker_really_blocks_the_writer(data_dir):
    # The same interpreter set-up refuses the writer: the test above would notice a reader that imports it.
    code = _READER.split("from dali_pipes.config")[0] + "import dali_pipes.writer.repack\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked for this test" in r.stderr


_TRAIN = _READER.split("from dali_pipes.config")[0] + r"""
import importlib, pkgutil, train
names = sorted(m.name for m in pkgutil.iter_modules(train.__path__, "train."))
for name in names:
    importlib.import_module(name)
blocked = [m for m in sys.modules if m.split(".")[0] in ("bson", "pymongo") or m.startswith("dali_pipes.writer")]
print(names, blocked)
"""


def test_train_needs_neither_writer_nor_pymongo():
    # Every module of train/ (the trainer, evaluation, predict) reads DATA only: repacking a --bson for
    # predict belongs to tools/predict.py, DATA's file names to dali_pipes/records.py.
    r = subprocess.run([sys.executable, "-c", _TRAIN], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.strip().splitlines()[-1]
    assert "'train.predict'" in out and "'train.train'" in out and out.endswith(" []"), out
