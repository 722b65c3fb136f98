"""train.cpus: the cores of a node shared out per local rank (data.cpu_share), on faked core sets and NUMA
nodes, and on this machine: the threads DALI and torch start after the share is applied stay on it."""
import os
import subprocess
import sys
import textwrap

import pytest

from train import cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_nodes(tmp_path, lists):
    for n, text in enumerate(lists):
        (tmp_path / f"node{n}").mkdir()
        (tmp_path / f"node{n}" / "cpulist").write_text(text + "\n")
    (tmp_path / "possible").write_text("0\n")  # other entries of the directory are no nodes
    return str(tmp_path)


def shares(allowed, world, reserve, nodes=None):
    return [cpus.partition_cpus(allowed, r, world, reserve, nodes) for r in range(world)]


@pytest.mark.parametrize("n_cores", [16, 112])
@pytest.mark.parametrize("world", [1, 4, 8])
def test_slices_are_disjoint_and_cover_what_the_reserve_leaves(n_cores, world):
    allowed = set(range(n_cores))
    got = shares(allowed, world, 2)
    flat = [c for s in got for c in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == allowed - {0, 1}  # the two lowest cores are the reserve, every other core is someone's
    sizes = [len(s) for s in got]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_restricted_affinity_set_is_what_gets_shared(tmp_path):
    # a container allowed cores 8..23 and 40..47 of a 2-node box: nothing outside them is handed out
    allowed = set(range(8, 24)) | set(range(40, 48))
    nodes = cpus.numa_nodes(fake_nodes(tmp_path, ["0-31", "32-63"]))
    got = shares(allowed, 4, 2, nodes)
    assert set().union(*map(set, got)) == allowed - {8, 9}
    assert sum(map(len, got)) == len(allowed) - 2


def test_numa_local_slices_where_sys_says(tmp_path):
    nodes = cpus.numa_nodes(fake_nodes(tmp_path, ["0-27,56-83", "28-55,84-111"]))  # hyperthreads: two ranges
    assert nodes == {0: set(range(28)) | set(range(56, 84)), 1: set(range(28, 56)) | set(range(84, 112))}
    for world in (4, 8):
        got = shares(set(range(112)), world, 2, nodes)
        for r, s in enumerate(got):
            node = 0 if r < world // 2 else 1  # ranks 0.. on node 0 first
            assert set(s) <= nodes[node], (world, r)
        flat = [c for s in got for c in s]
        assert len(flat) == len(set(flat)) and set(flat) == set(range(2, 112))
    # without the node directory the same cores are cut in order, and a rank's slice may span two nodes
    flat_cut = shares(set(range(112)), 8, 2, cpus.numa_nodes(str(tmp_path / "none")))
    assert flat_cut[3] == list(range(2 + 41, 2 + 55))


def test_too_few_cores_are_not_partitioned_and_say_so(monkeypatch):
    assert cpus.partition_cpus({0, 1}, 0, 2, 2) is None  # this 2-core machine with 2 ranks
    assert cpus.partition_cpus({0, 1, 2}, 1, 2, 2) is None
    assert cpus.partition_cpus({0, 1, 2, 3}, 1, 2, 2) == [3]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    pinned = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores))
    said = []
    assert cpus.apply_cpu_share("auto", 2, 1, 2, note=said.append) is None
    assert pinned == [] and len(said) == 1
    assert "2 usable cores less data.cpu_reserve=2" in said[0] and "not partitioned" in said[0]
    # auto leaves a lone process alone; off never partitions; an unknown mode is an error
    assert cpus.apply_cpu_share("auto", 0, 0, 1, note=said.append) is None
    assert cpus.apply_cpu_share("off", 0, 0, 2, note=said.append) is None and len(said) == 1
    with pytest.raises(ValueError, match="data.cpu_share must be one of auto, on, off"):
        cpus.apply_cpu_share("yes", 0, 0, 2)
    with pytest.raises(ValueError, match="local rank 2 is not in 0..1"):
        cpus.partition_cpus({0, 1}, 2, 2, 0)


def test_config_checks_the_keys():
    from dali_pipes.config import DataConfig

    with pytest.raises(ValueError, match="data.cpu_share must be one of"):
        DataConfig(cpu_share="numa").validate()
    with pytest.raises(ValueError, match="data.cpu_reserve must be >= 0"):
        DataConfig(cpu_reserve=-1).validate()
    assert DataConfig().cpu_share == "auto" and DataConfig().cpu_reserve == 2  # the README's defaults


PROBE = textwrap.dedent("""
    import os, sys
    before = set(os.listdir("/proc/self/task"))
    from train.cpus import apply_cpu_share
    share = apply_cpu_share("on", int(sys.argv[2]), 0, 1, note=print)
    import torch
    from dali_pipes.config import DataConfig
    from dali_pipes.dataset import open_dataset
    from dali_pipes.pipelines import build_pipeline
    paths, idxs, _ = open_dataset(sys.argv[1]).shards("train")
    pipe = build_pipeline(DataConfig(path=sys.argv[1], batch_size=8, num_threads=2), paths=paths,
                          index_paths=idxs, train=True)
    pipe.run()
    torch.randn(256, 256) @ torch.randn(256, 256)
    masks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            line = [l for l in f if l.startswith("Cpus_allowed_list")][0]
        masks[tid] = line.split()[1]
    new = {t: m for t, m in masks.items() if t not in before}
    print("SHARE", share, "THREADS", torch.get_num_threads(), "NEW", len(new))
    print("MASKS", sorted(set(new.values())), "MAIN", masks[str(os.getpid())])
""")


def test_threads_started_after_the_share_obey_it(data_dir):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 usable cores: one reserved, one shared")
    reserve = len(allowed) - 1  # the one core left: the highest allowed one
    r = subprocess.run([sys.executable, "-c", PROBE, str(data_dir), str(reserve)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    last = str(allowed[-1])
    assert f"SHARE [{allowed[-1]}] THREADS 1" in r.stdout
    new = int(r.stdout.split("NEW ")[1].split()[0])
    assert new >= 2  # DALI's workers (and torch's) were started, and every one of them has the one core
    assert f"MASKS ['{last}'] MAIN {last}" in r.stdout, r.stdout


def test_the_trainer_applies_the_share_before_its_threads_start(monkeypatch, tmp_path):
    """``Trainer._share_cpus`` (called first in ``Trainer.__init__``): torchrun's LOCAL_WORLD_SIZE and the
    rank's LOCAL_RANK pick the slice; ``train.num_threads``, where set, keeps torch's thread count."""
    import types

    import torch

    from train.config import Config
    from train.distributed import Dist
    from train.train import Trainer

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "numa_nodes", lambda node_dir=cpus.NODE_DIR: {})
    pinned, threads, said = [], [], []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(sorted(cores)))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cfg = Config()
    fake = types.SimpleNamespace(cfg=cfg, d=Dist(rank=5, world_size=8, local_rank=1), note=said.append)
    Trainer._share_cpus(fake)
    assert pinned == [[3, 4]] and threads == [2]  # cores 2..7 after the reserve, a quarter each (rounded)
    assert "local rank 1 of 4 decodes and computes on cores 3-4 (2 of 8; 2 kept for all)" in said[0]
    cfg.train.num_threads, cfg.data.cpu_share = 3, "on"
    Trainer._share_cpus(fake)
    assert pinned[-1] == [3, 4] and threads == [2]  # torch's count left to _set_determinism
    cfg.data.cpu_share = "off"
    Trainer._share_cpus(fake)
    assert len(pinned) == 2
