"""The GPU input choices of issue 27 (data.gpu_augment, data.gpu_decoder_crop, the dali-gpu decoder options):
on the CPU, which graph each choice selects and that a choice the batches cannot use leaves the CPU graph as
it is, with a note; on a GPU (marked gpu), that each graph yields the pixels of the graph it replaces."""
import numpy as np
import pytest
import torch

from dali_pipes.config import DataConfig
from dali_pipes.loader import build_loader
from dali_pipes.pipelines import build_pipeline, graph_name


def _cfg(data_dir, **kw):
    return DataConfig(**dict(dict(path=str(data_dir), backend="dali-cpu", batch_size=16, num_threads=1,
                                  initial_fill=64, seed=5), **kw))


def test_graph_names():
    cpu, gpu = DataConfig(backend="dali-cpu"), DataConfig(backend="dali-gpu", gpu_decoder_crop=True)
    assert graph_name(cpu, resize_check=False) == "window-decode"
    assert graph_name(cpu, resize_check=False, gpu_augment=True) == "gpu-augment"
    assert graph_name(cpu, resize_check=True) == "size-check"
    assert graph_name(gpu, resize_check=False) == "gpu-decoder-crop"
    assert graph_name(gpu, resize_check=True) == "size-check"  # a resize comes before any crop
    assert graph_name(DataConfig(backend="dali-gpu"), resize_check=False) == "whole-picture"


def test_gpu_augment_without_a_gpu_leaves_the_cpu_graph(data_dir, capfd):
    plain, _ = build_loader(_cfg(data_dir), 0, 1, "train")
    asked, _ = build_loader(_cfg(data_dir, gpu_augment=True), 0, 1, "train")  # batches stay on the CPU
    assert "data.gpu_augment ignored" in capfd.readouterr().err
    assert asked.graph == plain.graph == "window-decode"
    (xa, ya), (xp, yp) = next(iter(asked)), next(iter(plain))
    assert torch.equal(xa, xp) and torch.equal(ya, yp)  # the same crops and flips: the CPU path is unchanged


def test_gpu_augment_pipeline_needs_a_device(data_dir):
    from dali_pipes.dataset import open_dataset

    paths, idxs, _ = open_dataset(str(data_dir)).shards("train")
    with pytest.raises(ValueError, match="gpu_augment.*needs data.backend=dali-cpu .*and a CUDA device_id"):
        build_pipeline(_cfg(data_dir), paths=paths, index_paths=idxs, train=True, gpu_augment=True)


def test_decoder_options_are_checked():
    with pytest.raises(ValueError, match="data.bytes_per_sample_hint must be >= 0"):
        DataConfig(bytes_per_sample_hint=-1).validate()
    with pytest.raises(ValueError, match="data.hw_decoder_load is a share of the JPEGs: 0 to 1, not 1.5"):
        DataConfig(hw_decoder_load=1.5).validate()
    d = DataConfig()  # DALI's own defaults until a GPU measurement decides (BENCHMARKS.md)
    assert d.decoder_affine and d.bytes_per_sample_hint == 0 and not d.gpu_decoder_crop and not d.gpu_augment


# ---- GPU (skipped without CUDA) -------------------------------------------------------------------------------
def _prints(loader, n=3):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.cpu(), y.cpu()))
        if i + 1 == n:
            break
    return out


@pytest.mark.gpu
def test_gpu_augment_yields_the_window_decoder_pixels_on_the_gpu(data_dir):
    """The same draws (crop positions, flips: one seed, one operator order), crop and mirror on the GPU."""
    dev = torch.device("cuda", 0)
    cpu, _ = build_loader(_cfg(data_dir), 0, 1, "train", device=dev)
    gpu, _ = build_loader(_cfg(data_dir, gpu_augment=True), 0, 1, "train", device=dev)
    assert gpu.graph == "gpu-augment" and cpu.graph == "window-decode"
    for (xc, yc), (xg, yg) in zip(_prints(cpu), _prints(gpu)):
        assert torch.equal(yc, yg) and xg.shape == xc.shape
        # DALI's decoder there, libjpeg-turbo's own here: the same pixels on the CPU (test_loader), a
        # tolerance for another machine's libjpeg build
        assert float((xg.float() - xc.float()).abs().mean()) < 0.5


@pytest.mark.gpu
def test_gpu_decoder_crop_and_options_match_the_whole_picture_graph(data_dir):
    dev = torch.device("cuda", 0)
    ref, _ = build_loader(_cfg(data_dir, backend="dali-gpu"), 0, 1, "train", device=dev)
    opt, _ = build_loader(_cfg(data_dir, backend="dali-gpu", gpu_decoder_crop=True, decoder_affine=False,
                               bytes_per_sample_hint=180 * 180 * 3, hw_decoder_load=0.99, prefetch=4), 0, 1, "train",
                          device=dev)
    assert opt.graph == "gpu-decoder-crop" and ref.graph == "whole-picture"
    diffs = []
    for (xr, yr), (xo, yo) in zip(_prints(ref), _prints(opt)):
        assert torch.equal(yr, yo) and xo.shape == xr.shape
        diffs.append((xo.float() - xr.float()).abs().flatten())
    d = torch.cat(diffs)
    assert float(d.mean()) < 1.5 and float(np.percentile(d.numpy(), 99)) < 24


def test_compile_mode_is_checked_and_reaches_torch_compile(monkeypatch):
    import types

    from train.config import ConfigError, load_config
    from train.distributed import Dist
    from train.train import Trainer

    with pytest.raises(ConfigError, match="model.compile_mode must be one of default, max-autotune-no-cudagraphs, "
                                          "reduce-overhead, not 'fast'"):
        load_config("demo", ["model.compile_mode=fast"]).validate()
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    cfg = load_config("demo", ["model.compile=true", "model.compile_mode=reduce-overhead"])
    fake = types.SimpleNamespace(cfg=cfg, d=Dist(), raw=torch.nn.Linear(2, 2), dev=torch.device("cpu"))
    Trainer._wrap_model(fake)
    assert seen == ["reduce-overhead"] and fake._cudagraphs  # each step then tells the CUDA graphs it begins
    cfg.model.compile_mode = "max-autotune-no-cudagraphs"
    Trainer._wrap_model(fake)
    assert seen[-1] == "max-autotune-no-cudagraphs" and not fake._cudagraphs
