"""The autocast policy (``dali_pipes.config.resolve_amp``): bf16 only where the device computes it in hardware;
elsewhere the run falls back to float32, says so in a ``note:`` line and records what it used."""
import pytest
import yaml

from dali_pipes import config as dc
from tests.test_train_distributed import _cfg


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detection at a made-up /proc/cpuinfo with the given flags line."""
    def use(line):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
        monkeypatch.setattr(dc, "CPUINFO", str(path))
    return use


def test_fast_bf16_reads_the_cpu_flags(cpuinfo, monkeypatch, tmp_path):
    cpuinfo("flags\t\t: fpu sse2 avx2 avx512f avx512bw")  # AVX-512 without its BF16 extension: emulated
    assert not dc.fast_bf16("cpu")
    cpuinfo("flags\t\t: fpu avx2 avx512f avx512_bf16")
    assert dc.fast_bf16("cpu")
    cpuinfo("flags\t\t: fpu avx2 amx_bf16 amx_tile")
    assert dc.fast_bf16("cpu")
    cpuinfo("Features\t: fp asimd sve bf16 i8mm")  # Arm
    assert dc.fast_bf16("cpu")
    monkeypatch.setattr(dc, "CPUINFO", str(tmp_path / "none"))  # not Linux
    assert not dc.fast_bf16("cpu")
    notes = []
    assert dc.resolve_amp("bf16", "cpu", note=notes.append) == "off" and "amp bf16 -> off" in notes[0]
    assert dc.resolve_amp("fp16", "cpu", note=notes.append) == "fp16" and dc.resolve_amp("off", "cpu") == "off"
    assert len(notes) == 1


@pytest.mark.parametrize("flags,used", [("fpu avx2", "off"), ("fpu avx2 avx512_bf16", "bf16")])
def test_trainer_uses_and_records_the_amp_the_cpu_supports(cpuinfo, tmp_path, capsys, flags, used):
    import torch

    from train.distributed import Dist
    from train.train import Trainer

    cpuinfo(f"flags\t\t: {flags}")
    run = tmp_path / "RUN"
    tr = Trainer(_cfg(tmp_path, train={"amp": "bf16"}), str(run), Dist())
    assert tr.cfg.train.amp == used and tr.amp_dtype == (torch.bfloat16 if used == "bf16" else None)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["amp"] == used
    assert ("note: cpu has no fast bf16" in capsys.readouterr().out) == (used == "off")
    assert f"amp {used}" in tr._start_line()
    tr.close()
