"""tools/gpu_check.sh on the CPU (its documented dry run, the demo model): the script a GPU session runs with
minutes of device time must not fail on a typo, must keep to at most 8 files, and must fit its time."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY = {"PY": sys.executable, "TUNE_RECIPE": "demo", "RUN_RECIPE": "demo", "CATEGORIES": "20", "TUNE_SECONDS": "1",
       "TUNE_BUDGET": "20", "TEST_SECONDS": "120",
       "TUNE_BATCHES": "16 24",
       "RUN_ARGS": "train.max_steps=5 data.batch_size=16 train.tensorboard=false"}


def _check(out, total, products=("300", "200")):
    env = dict(os.environ, TOTAL_SECONDS=str(total), OMP_NUM_THREADS="1", **DRY)
    return subprocess.run(["bash", "tools/gpu_check.sh", str(out), *products], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=total + 120)


def test_dry_run_every_step_and_at_most_eight_files(tmp_path):
    r = _check(tmp_path / "out", 400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("generate", "repack_train", "repack_test", "tune", "train_run", "predict", "pytest_gpu"):
        assert f"   {name}: exit 0 after" in r.stdout, (name, r.stdout[-3000:])
    assert "override: data.backend=dali-cpu" in r.stdout and "products_per_s=" in r.stdout
    assert "ranked (real data):" in r.stdout and " 1. dali-cpu t" in r.stdout  # the tune's table
    files = sorted(os.listdir(tmp_path / "out"))
    assert len(files) <= 8 and {"tune.json", "predict.json", "pytest_gpu.log", "extra.tar.gz"} <= set(files), files
    assert "done in " in r.stdout


def test_a_step_without_time_left_is_skipped(tmp_path):
    """TOTAL_SECONDS bounds the whole check: the first step's share of 8 s is under the 10 s a step needs."""
    r = _check(tmp_path / "out", 8)
    assert r.returncode == 1
    # the seconds left: 8, or less where the machine is busy before the first step starts
    assert re.search(r"generate: skipped, [0-8] s of TOTAL_SECONDS=8 left", r.stdout), r.stdout
    assert "tune" not in r.stdout
