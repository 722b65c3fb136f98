"""Shared fixtures: small generated data sets, built once per test session.

- ``synthetic_dir``: ``tools.make_synthetic`` output (train.bson, test.bson, category_names.csv,
  test_answers.csv): 400 train products in 8 categories, 60 test products.
- ``data_dir``: its train.bson repacked (val fraction 0.2): DATA/{train,val,products/k1..k4}.
- ``test_data_dir``: its test.bson repacked with ``--unlabelled`` (split ``test``, labels -1).
- ``sorted_synthetic_dir``: the same train products, train.bson sorted by category (tests/test_order.py).

Tests marked ``gpu`` (quick: ``pytest -m gpu``) and ``gpu_slow`` (long sweeps: ``pytest -m gpu_slow``) are
skipped where torch sees no CUDA device. Each of them runs under a time limit (``GPU_TEST_TIMEOUT_S``
seconds, or ``@pytest.mark.gpu_timeout(S)``): past it the test fails instead of holding the machine.
"""
import signal

import pytest

SYN_PRODUCTS, SYN_TEST_PRODUCTS, SYN_CATEGORIES, SYN_SEED = 400, 60, 8, 0


GPU_MARKERS = ("gpu", "gpu_slow")
GPU_TEST_TIMEOUT_S = 150


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); quick")
    config.addinivalue_line("markers", "gpu_slow: needs a CUDA GPU (skipped without one); a long sweep, run "
                                       "with -m gpu_slow")
    config.addinivalue_line("markers", f"gpu_timeout(seconds): time limit of a GPU test (default "
                                       f"{GPU_TEST_TIMEOUT_S} s)")


def _is_gpu(item) -> bool:
    return any(m in item.keywords for m in GPU_MARKERS)


def pytest_collection_modifyitems(config, items):
    if not any(_is_gpu(item) for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if _is_gpu(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_time_limit(request):
    """SIGALRM-based limit for GPU tests (no plugin needed on a bare GPU machine)."""
    if not _is_gpu(request.node) or not hasattr(signal, "SIGALRM"):
        yield
        return
    marker = request.node.get_closest_marker("gpu_timeout")
    seconds = int(marker.args[0]) if marker else GPU_TEST_TIMEOUT_S

    def expired(signum, frame):
        pytest.fail(f"{request.node.nodeid}: over its time limit of {seconds} s", pytrace=False)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from tools import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    rc = make_synthetic.main(["--out", str(out), "--products", str(SYN_PRODUCTS), "--test-products",
                              str(SYN_TEST_PRODUCTS), "--categories", str(SYN_CATEGORIES), "--seed", str(SYN_SEED)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def data_dir(synthetic_dir, tmp_path_factory):
    from tools import repack

    out = tmp_path_factory.mktemp("data") / "DATA"
    rc = repack.main(["--bson", str(synthetic_dir / "train.bson"), "--categories",
                      str(synthetic_dir / "category_names.csv"), "--out", str(out), "--val-fraction", "0.2",
                      "--workers", "1", "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def test_data_dir(synthetic_dir, tmp_path_factory):
    from tools import repack

    out = tmp_path_factory.mktemp("data_test") / "DATA_TEST"
    rc = repack.main(["--bson", str(synthetic_dir / "test.bson"), "--unlabelled", "--out", str(out),
                      "--workers", "1", "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def sorted_synthetic_dir(tmp_path_factory):
    """``synthetic_dir``'s products, train.bson sorted by category (``make_synthetic --order sorted``)."""
    from tools import make_synthetic

    out = tmp_path_factory.mktemp("synthetic_sorted")
    assert make_synthetic.main(["--out", str(out), "--products", str(SYN_PRODUCTS), "--test-products", "10",
                                "--categories", str(SYN_CATEGORIES), "--seed", str(SYN_SEED), "--order", "sorted"]) == 0
    return out


# ---- the trainer's tests (tests/test_train_*.py) ---------------------------------------------------------
DEMO_PRODUCTS, DEMO_CATEGORIES, DEMO_SEED = 2000, 20, 0
DEMO_FIXTURE = ["train.epochs=2", "data.image_size=180"]  # trained_demo's overrides of the demo recipe


def demo_raw_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "demo_synthetic"


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """The set `make demo` trains on: 2,000 products in 20 categories, repacked with val fraction 0.1."""
    from tools import make_synthetic, repack

    raw = demo_raw_dir(tmp_path_factory)
    assert make_synthetic.main(["--out", str(raw), "--products", str(DEMO_PRODUCTS), "--test-products", "300",
                                "--categories", str(DEMO_CATEGORIES), "--seed", str(DEMO_SEED)]) == 0
    out = tmp_path_factory.mktemp("demo_data") / "DATA"
    assert repack.main(["--bson", str(raw / "train.bson"), "--categories", str(raw / "category_names.csv"),
                        "--out", str(out), "--val-fraction", "0.1", "--workers", "1", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def trained_demo(demo_data_dir, tmp_path_factory):
    """`train/run.sh demo` (``DEMO_FIXTURE``) on the demo set, run once per session: the predictor's tests use
    its best.pt."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = tmp_path_factory.mktemp("demo_run") / "RUN"
    # 2 of the recipe's 5 epochs: the tests need a trained model, not the last percent, and the suite stays
    # short. No resize (image_size 180): the predictor's tests crop the 180 pictures by hand.
    r = subprocess.run(["bash", "train/run.sh", "demo", "--data", str(demo_data_dir), "--out", str(run)] + DEMO_FIXTURE,
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"raw": demo_raw_dir(tmp_path_factory), "data": demo_data_dir, "run": run,
            "ckpt": str(run / "best.pt"), "stdout": r.stdout}


def tb_steps(tb_dir, tag="train/loss"):
    """The steps TensorBoard shows for ``tag`` in ``tb_dir``, as its reader resolves a resumed run's purge."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def process_tree(pid):
    """``pid`` and its descendants, read from /proc: a run.sh's torchrun and its workers (which torchrun starts
    in sessions of their own, so a process-group signal misses them)."""
    import os

    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out
