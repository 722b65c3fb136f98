"""The window decoder (dali_pipes/native): DALI's decode + crop + mirror, pixel for pixel, for every kind of
JPEG it takes; a clear error for one it cannot decode; and the loader without it."""
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dali_pipes.config import DataConfig
from dali_pipes.dataset import open_dataset
from dali_pipes.loader import build_loader
from dali_pipes.native import window_decoder
from dali_pipes.pipelines import build_pipeline
from dali_pipes.records import read_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(img: Image.Image, **kw) -> np.ndarray:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=90, **kw)
    return np.frombuffer(b.getvalue(), np.uint8)


def _pictures():
    """A 200 wide x 180 high picture in every form the decoder handles differently: each EXIF orientation
    (5-8 turn it on its side), grayscale, progressive, CMYK, 4:4:4 chroma."""
    rng = np.random.default_rng(0)
    base = np.add.outer(np.arange(180), np.arange(200)) % 256
    rgb = np.stack([base, base[::-1], np.roll(base, 40, 1)], -1) + rng.integers(0, 30, (180, 200, 3))
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    out = {}
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        out[f"exif{o}"] = _jpeg(im, exif=exif.tobytes())
    out.update(gray=_jpeg(im.convert("L")), progressive=_jpeg(im, progressive=True), cmyk=_jpeg(im.convert("CMYK")),
               yuv444=_jpeg(im, subsampling=0))
    return out


def _run(jpegs, window, mirror):
    """(window decoder's batch, DALI decode + crop_mirror_normalize's batch) at the same random positions."""
    from nvidia.dali import fn, pipeline_def, types

    assert window_decoder()[0]

    @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=None, seed=3)
    def pipe():
        j = fn.external_source(source=lambda: jpegs, batch=True)
        px, py = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        ours = fn.window_decode(j, window=window, crop_pos_x=px, crop_pos_y=py, mirror=mirror)
        whole = fn.decoders.image(j, device="cpu", output_type=types.RGB)
        dalis = fn.crop_mirror_normalize(whole, crop=window, crop_pos_x=px, crop_pos_y=py, mirror=mirror,
                                         dtype=types.UINT8, output_layout="HWC")
        return ours, dalis

    p = pipe()
    p.build()
    a, b = p.run()
    return [np.array(t) for t in a], [np.array(t) for t in b], a.layout()


@pytest.mark.parametrize("mirror", [0, 1])
def test_window_decoder_yields_dalis_decode_crop_and_mirror(mirror):
    pics = _pictures()
    ours, dalis, layout = _run(list(pics.values()), (150, 143), mirror)  # 143: 28 groups of 5 pixels and 3
    assert layout == "HWC"
    for name, a, b in zip(pics, ours, dalis):
        assert a.shape == b.shape == (150, 143, 3) and a.dtype == np.uint8, name
        assert np.array_equal(a, b), name


def test_a_picture_smaller_than_the_window_is_an_error():
    small = _jpeg(Image.new("RGB", (100, 120), (9, 99, 199)))
    with pytest.raises(RuntimeError, match="picture of 100x120 is smaller than the window of 140x150"):
        _run([small], (150, 140), 0)


def test_a_jpeg_that_does_not_decode_names_its_shard(data_dir, tmp_path):
    """A shard corrupted after the repack (its JPEG's start overwritten in place): the error names the
    shard and the record, says what libjpeg found, and what to do."""
    data = tmp_path / "DATA"
    shutil.copytree(data_dir, data)
    ds = open_dataset(str(data))
    paths, idxs, _ = ds.shards("val")
    raw = bytearray(open(paths[0], "rb").read())
    jpeg = next(read_examples(paths[0]))["image"]
    at = raw.find(jpeg)
    raw[at:at + 2] = b"\x00\x00"  # no start-of-image marker
    open(paths[0], "wb").write(bytes(raw))
    cfg = DataConfig(path=str(data), backend="dali-cpu", batch_size=8, num_threads=1)
    pipe = build_pipeline(cfg, paths=paths, index_paths=idxs, train=False, resize_check=False)
    with pytest.raises(RuntimeError) as e:
        pipe.run()
    msg = str(e.value)
    assert "window_decode: the JPEG of sample 0" in msg and os.path.basename(paths[0]) in msg, msg
    assert "Not a JPEG file" in msg and "Repack with --verify decode" in msg, msg


def test_without_the_window_decoder_the_loader_says_why_and_yields_the_same_batches(data_dir, tmp_path):
    """No compiler (CXX names none) and no library built yet: `python -m dali_pipes.native` exits 1 saying
    so, and the dali-cpu loader notes why and runs DALI's decoder on the whole picture, whose batches are
    those of the window decoder, pixel for pixel."""
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), DALI_PIPES_NATIVE_DIR=str(tmp_path / "native"),
               PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "dali_pipes.native"], env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "window decoder NOT built: no C++ compiler" in p.stderr, p.stderr
    script = (
        "import sys, torch\n"
        "from dali_pipes.config import DataConfig\n"
        "from dali_pipes.loader import build_loader\n"
        f"cfg = DataConfig(path={str(data_dir)!r}, backend='dali-cpu', batch_size=8, num_threads=1, seed=5)\n"
        "loader, _ = build_loader(cfg, 0, 1, 'train')\n"
        "print(loader.graph)\n"
        f"torch.save(next(iter(loader)), {str(tmp_path / 'batch.pt')!r})\n")
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["whole-picture"]
    assert "the window decoder is not available (no C++ compiler" in p.stderr, p.stderr
    assert "python -m dali_pipes.native` builds it" in p.stderr, p.stderr
    cfg = DataConfig(path=str(data_dir), backend="dali-cpu", batch_size=8, num_threads=1, seed=5)
    loader, _ = build_loader(cfg, 0, 1, "train")
    assert loader.graph == "window-decode"
    images, labels = next(iter(loader))
    theirs = torch.load(tmp_path / "batch.pt", weights_only=True)
    assert torch.equal(images, theirs[0]) and torch.equal(labels, theirs[1])


def test_cuda_headers_from_a_toolkit_or_the_wheels(tmp_path, monkeypatch):
    """DALI's headers include CUDA's runtime, crt/ and nv/ headers: from a toolkit that has all three, else
    from the nvidia-* wheels that hold them (pip spreads them over three); the wheels to install where one
    is missing."""
    import dali_pipes.native as native

    def touch(root, header):
        (root / header).parent.mkdir(parents=True, exist_ok=True)
        (root / header).write_text("")

    toolkit, site = tmp_path / "cuda-12.4" / "include", tmp_path / "site"
    wheel = {h: site / "nvidia" / name / "include" for h, name in
             (("cuda_runtime_api.h", "cuda_runtime"), ("crt/host_config.h", "cuda_nvcc"), ("nv/target", "cuda_cccl"))}
    for h in ("cuda_runtime_api.h", "crt/host_config.h"):
        touch(toolkit, h)
        touch(wheel[h], h)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(native, "_TOOLKITS", str(tmp_path / "cuda-*" / "include"))
    monkeypatch.setattr(sys, "path", [str(site)])
    monkeypatch.setattr("site.getsitepackages", lambda: [])
    monkeypatch.setattr("site.getusersitepackages", lambda: str(tmp_path / "none"))
    with pytest.raises(native.BuildError, match=r"missing \(nv/target\).*pip install nvidia-cuda-cccl-cu12$"):
        native._cuda_includes()
    touch(wheel["nv/target"], "nv/target")
    assert native._cuda_includes() == [str(wheel[h]) for h in ("cuda_runtime_api.h", "crt/host_config.h", "nv/target")]
    touch(toolkit, "nv/target")
    assert native._cuda_includes() == [str(toolkit)]
