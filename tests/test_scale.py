"""Memory that must not grow with the catalogue, and the tools that measure how cost grows (bench scale)."""
import glob
import os
import sys
import tracemalloc

import bson
import numpy as np
import pytest

import dali_pipes.writer.repack as rp
from dali_pipes.dataset import read_quarantine
from dali_pipes.records import QUARANTINE_FILE
from dali_pipes.writer.bson_io import scan_offsets
from tests.test_repack import CAT0, good_docs, write_bson, write_cats
from tools import bench


def test_offset_scan_holds_about_8_bytes_per_document_and_field(tmp_path):
    # Three Python lists of ints cost ~120 bytes a document (760 MB at the real train.bson's 7.07M
    # documents, then a numpy copy on top); the scan keeps typed arrays: 24 bytes, plus one copy at a time.
    n = 30_000
    path = write_bson(tmp_path / "many.bson", [{"_id": 10_000_000 + i, "x": i} for i in range(n)])
    tracemalloc.start()
    try:
        index = scan_offsets(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == n and index.ids[-1] == 10_000_000 + n - 1 and index.complete
    assert np.array_equal(np.diff(index.offsets), index.lengths[:-1])
    assert peak / n < 60, f"{peak / n:.0f} bytes of Python memory per document during the offset scan"


def test_quarantine_rows_reach_the_file_while_the_repack_runs(tmp_path, monkeypatch):
    # Each chunk's quarantine rows go to quarantine.csv's temporary as the chunk ends, not into a list that
    # grows with the whole file. Three chunks, a bad product in each; while the last chunk runs, the rows of
    # the first two are already in the file.
    docs = []
    for c in range(3):
        docs += good_docs(6, start=100 * c) + [{"_id": 100 * c + 99, "category_id": CAT0, "imgs": []}]
    src = write_bson(tmp_path / "in.bson", docs)
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    out = str(tmp_path / "D")
    chunk_bytes = sum(len(bson.encode(d)) for d in docs[:7])
    seen, done_ids = [], []
    real = rp._process_chunk

    def spy(task):
        temps = glob.glob(os.path.join(out, f".{QUARANTINE_FILE}.*.tmp"))
        with open(temps[0]) if temps else open(os.devnull) as f:
            seen.append((list(done_ids), f.read()))
        done_ids.extend(task[4].tolist())  # the offset scan's ids of the chunk's documents
        return real(task)

    monkeypatch.setattr(rp, "_process_chunk", spy)
    m = rp.repack(src, out, categories=cats, workers=1, shard_size_mb=chunk_bytes / (1 << 20), progress=False)
    assert len(seen) >= 3
    for before, text in seen:  # the rows of the chunks done before this one, none of the others
        assert [f"\n{100 * c + 99}," in text for c in range(3)] == [100 * c + 99 in before for c in range(3)], text
    assert "\n99," in seen[-1][1]
    q = read_quarantine(out)
    assert [r["product_id"] for r in q] == ["99", "199", "299"]
    assert all(r["reason"] == "product has no images" for r in q)
    assert m["quarantine"]["rows"] == 3 and m["counts"]["products_quarantined"] == 3
    assert m["counts"]["products_read"] == m["counts"]["products_written"] + 3
    assert not glob.glob(os.path.join(out, "*.tmp")) and not glob.glob(os.path.join(out, ".*.tmp"))


def test_failed_repack_leaves_no_quarantine_file_or_temporary(tmp_path, monkeypatch):
    docs = good_docs(6) + [{"_id": 99, "category_id": CAT0, "imgs": []}] + good_docs(6, start=200)
    src = write_bson(tmp_path / "in.bson", docs)
    cats = write_cats(tmp_path / "cats.csv", [CAT0, CAT0 + 1, CAT0 + 2])
    out = str(tmp_path / "D")
    real, calls = rp._process_chunk, []

    def fail_second(task):
        calls.append(task[1])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(task)

    monkeypatch.setattr(rp, "_process_chunk", fail_second)
    chunk_bytes = sum(len(bson.encode(d)) for d in docs[:7])
    with pytest.raises(OSError, match="simulated"):
        rp.repack(src, out, categories=cats, workers=1, shard_size_mb=(chunk_bytes - 1) / (1 << 20), progress=False)
    left = sorted(os.listdir(out))
    assert QUARANTINE_FILE not in left and not [n for n in left if n.endswith(".tmp")], left


# ---- bench scale: the measurement and the fit -----------------------------------------------------------
def test_fit_power_recovers_offset_scale_and_exponent():
    n = np.array([10_000, 40_000, 160_000, 640_000])
    for e in (0.5, 1.0, 1.3):
        f = bench.fit_power(n, 3.0 + 2e-4 * n ** e)
        assert f["e"] == pytest.approx(e, abs=0.002)
        assert f["a"] == pytest.approx(3.0, rel=0.01) and f["b"] == pytest.approx(2e-4, rel=0.05)
    flat = bench.fit_power(n, [5.0, 5.0, 5.0, 5.0])
    assert flat["b"] == pytest.approx(0.0, abs=1e-12) and flat["a"] == pytest.approx(5.0)


ALLOC = ("import os, sys, time\n"
         "import numpy as np\n"
         "root_mb, child_mb = int(sys.argv[1]), int(sys.argv[2])\n"
         "pid = os.fork()\n"
         "if pid == 0:\n"
         "    a = np.ones(child_mb << 17); time.sleep(0.6); os._exit(0)\n"
         "b = np.ones(root_mb << 17)\n"
         "os.waitpid(pid, 0)\n")


def test_measure_command_separates_the_process_from_its_children():
    # The root and the child it forks each fill their own array: the peaks must tell them apart (the root's
    # is the kernel's exact figure, as it is the tree's largest), and a failing command is an error.
    r = bench.measure_command([sys.executable, "-c", ALLOC, "160", "60"], interval=0.05)
    assert 160 + 10 < r["root_peak_rss_mb"] < 160 + 60, r
    assert 150 < r["root_peak_anon_mb"] <= r["root_peak_rss_mb"], r  # an array is anonymous memory
    assert 60 < r["max_child_peak_rss_mb"] < 160, r
    assert 50 < r["max_child_peak_private_mb"] <= r["max_child_peak_rss_mb"], r  # its own array, not shared
    assert len(r["children"]) == 1 and r["cpu_s"] > 0 and r["wall_s"] >= 0.6
    with pytest.raises(ValueError, match="exit status 3"):
        bench.measure_command([sys.executable, "-c", "raise SystemExit(3)"])


def test_bench_loader_epoch_reads_exactly_one_epoch(data_dir):
    from dali_pipes.config import DataConfig
    from dali_pipes.loader import build_loader

    a = bench.build_parser().parse_args(["loader", "--data", str(data_dir), "--backend", "dali-cpu", "--batch", "16",
                                         "--threads", "1", "--crop", "64", "--epoch", "--seconds", "0"])
    res = bench.bench_loader(a)
    _, steps = build_loader(DataConfig(path=str(data_dir), backend="dali-cpu", batch_size=16, num_threads=1,
                                       crop=64), 0, 1, "train")
    assert steps > 2 and res["epoch"]["batches"] == steps and res["epoch"]["images"] == steps * 16
    assert res["epoch"]["cpu_s"] > 0 and res["epoch"]["peak_rss_mb"] > 0


def test_clean_writes_the_rows_a_block_at_a_time(tmp_path, monkeypatch):
    # 50,000 score rows: the CSV text and the Python rows of all of them at once take ~15 MB (measured); a
    # block of 4,096 at a time, ~1.3 MB.
    from tools import clean

    n = 50_000
    rng = np.random.default_rng(0)
    scores = {"product_id": np.arange(n, dtype=np.int64) // 2, "image_index": (np.arange(n) % 2).astype(np.int32),
              "label": rng.integers(0, 3, n).astype(np.int32), "loss": rng.random(n),
              "pred": rng.integers(0, 3, n).astype(np.int32), "category_ids": [CAT0, CAT0 + 1, CAT0 + 2]}
    monkeypatch.setattr(clean, "ROWS_BLOCK", 4096)
    path = str(tmp_path / "scores.csv")
    tracemalloc.start()
    try:
        clean.write_rows(path, scores, range(n), "", clean.FIELDS[:5])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == ",".join(clean.FIELDS[:5]) and len(lines) == n + 1
    last = n - 1
    assert lines[-1] == (f"{last // 2},1,{CAT0 + scores['label'][last]},{scores['loss'][last]:.6f},"
                         f"{CAT0 + scores['pred'][last]}")
    assert peak < 5 << 20, f"{peak / 2**20:.1f} MB held while writing {n:,} rows"
