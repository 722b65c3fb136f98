"""Configuration of the data path: one typed dataclass shared by the loader, the trainer and the tools.

The loader hands out pixels as they are (uint8, NHWC); the normalization (mean, std, dtype, memory format)
belongs to the model (``models.heads.Net.prepare_input``), so it is not configured here. The one rule for
the size of a picture is ``DataConfig.picture_hw``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

BACKENDS = ("dali-gpu", "dali-cpu", "synthetic")
CPU_SHARE_MODES = ("auto", "on", "off")  # data.cpu_share (train.cpus): auto partitions with several local ranks
SHUFFLES = ("epoch", "buffer")  # data.shuffle
# Keys of older configs (checkpoints written before the loader yielded uint8 NHWC): the normalization moved
# into the model, so a saved config drops them (``drop_legacy_keys``); a recipe that sets one is an error.
LEGACY_KEYS = ("dtype", "channels_last", "mean", "std")


def tile_grid(tiled_k: int) -> Tuple[int, int]:
    """(rows, columns) of the pictures in one sample, the one place that knows the tiled layout: 1x1 for a
    picture, a 1xK strip for K=2, 3, a 2x2 grid for K=4 (row-major: image_0 image_1 / image_2 image_3)."""
    return (2, 2) if tiled_k == 4 else (1, max(1, tiled_k))


@dataclass
class DataConfig:
    path: str = ""  # a repacked DATA directory (tools.repack); ignored by the synthetic backend
    backend: str = "dali-cpu"  # dali-gpu | dali-cpu | synthetic
    batch_size: int = 64  # per GPU / per process
    image_size: int = 180  # pictures whose shorter side differs are resized to it (aspect kept) before the crop
    crop: int = 160  # side of the random (train) or center (eval) crop
    eval_crop: bool = True  # eval: center crop of `crop` (True) or the full image (False)
    tiled_k: int = 0  # 0: image shards; 1: single-image products (products/k1); 2..4: tiled products/k{K}
    num_threads: int = 4  # DALI CPU threads per pipeline
    prefetch: int = 2  # DALI prefetch queue depth
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100), dali-gpu only
    # dali-gpu decoder options (issue 27; DALI's defaults until a GPU measurement says otherwise): nvJPEG's host
    # threads pinned to cores near the GPU (affine), the decoder's output buffer per sample allocated up front
    # (bytes, 0: DALI's default), and on all-square shards the window cut by the decoder (decoders.image_crop).
    decoder_affine: bool = True
    bytes_per_sample_hint: int = 0
    gpu_decoder_crop: bool = False
    # dali-cpu feeding a GPU, as NVIDIA's ResNet-50 example: the CPU reads and decodes whole pictures, an
    # in-pipeline .gpu(), then crop and flip on the GPU in DALI. Batches that stay on the CPU ignore it (a note).
    gpu_augment: bool = False
    initial_fill: int = 4096  # shuffle buffer of the reader
    # train order: "epoch" (each epoch reads the records in a new seeded order: random reads) or "buffer"
    # (each rank reads its shards front to back through the shuffle buffer only: sequential reads, for disks
    # that seek slowly; nearly the same order every epoch)
    shuffle: str = "epoch"
    seed: int = 42
    # Each local rank's DALI and torch threads on cores of its own (train.cpus): auto with several processes
    # on the node, on also with one, off never; cpu_reserve lowest-numbered cores are left to all of them.
    cpu_share: str = "auto"
    cpu_reserve: int = 2
    synthetic_num_classes: int = 1000  # synthetic backend only (no DATA to read the class count from)
    synthetic_steps: int = 100  # synthetic backend: steps per epoch

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.crop > self.image_size:
            raise ValueError(f"data.crop ({self.crop}) is larger than data.image_size ({self.image_size})")
        if self.tiled_k not in (0, 1, 2, 3, 4):
            raise ValueError(f"data.tiled_k must be 0 (every image), 1 (the single-image products, products/k1) "
                             f"or 2, 3, 4 (products of K images tiled), not {self.tiled_k}")
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"data.shuffle must be one of {', '.join(SHUFFLES)}, not {self.shuffle!r}")
        if self.crop < 1:
            raise ValueError("data.crop must be >= 1")
        if self.cpu_share not in CPU_SHARE_MODES:
            raise ValueError(f"data.cpu_share must be one of {', '.join(CPU_SHARE_MODES)}, not {self.cpu_share!r}")
        if self.bytes_per_sample_hint < 0:
            raise ValueError(f"data.bytes_per_sample_hint must be >= 0 (0: DALI's default), not "
                             f"{self.bytes_per_sample_hint}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"data.hw_decoder_load is a share of the JPEGs: 0 to 1, not {self.hw_decoder_load}")
        if self.cpu_reserve < 0:
            raise ValueError(f"data.cpu_reserve must be >= 0, not {self.cpu_reserve}")

    def picture_side(self, train: bool) -> int:
        """The crop rule, in one place: a train picture is a random ``crop`` x ``crop`` window, an eval
        picture the centre ``crop`` window (``eval_crop``) or the whole ``image_size`` square. Every picture
        is first resized so that its shorter side is ``image_size`` (the real data needs no resize)."""
        return self.crop if (train or self.eval_crop) else self.image_size

    def picture_hw(self, train: bool) -> Tuple[int, int]:
        """(H, W) of one sample: the picture, or K pictures tiled (K=2, 3: a strip; K=4: a 2x2 grid)."""
        s = self.picture_side(train)
        rows, cols = tile_grid(self.tiled_k)
        return rows * s, cols * s

    def pipeline_signature(self) -> dict:
        """The settings that decide which samples a reader yields in which order.

        A DALI reader checkpoint is only valid for a pipeline with the same signature."""
        return {
            "backend_kind": "synthetic" if self.backend == "synthetic" else "dali",
            "batch_size": self.batch_size,
            "tiled_k": self.tiled_k,
            "initial_fill": self.initial_fill,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "crop": self.crop,
            "image_size": self.image_size,
        }


def _say(msg: str, note: Optional[Callable[[str], None]]) -> None:
    if note is None:
        print(f"note: {msg}", file=sys.stderr, flush=True)
    else:
        note(msg)


def resolve_backend(backend: Optional[str], note: Optional[Callable[[str], None]] = None) -> str:
    """The one backend policy of every entry point (training, ``tools.predict``, ``tools.bench``).

    ``None`` (a tool's default) means dali-gpu where torch sees a CUDA device, else dali-cpu. dali-gpu on a
    machine without a CUDA device falls back to dali-cpu (the same graph, decoded on the CPU), and ``note``
    (default: print to stderr) says so; the entry point then records the backend it really used. Any other
    backend is returned as it is. The loader itself never falls back (``require_backend``)."""
    import torch

    has_gpu = torch.cuda.is_available()
    if backend is None:
        return "dali-gpu" if has_gpu else "dali-cpu"
    if backend == "dali-gpu" and not has_gpu:
        _say("no CUDA device visible: data.backend dali-gpu -> dali-cpu (decoding on the CPU)", note)
        return "dali-cpu"
    return backend


CPUINFO = "/proc/cpuinfo"
# x86: AVX-512 BF16 and AMX; Arm: the BF16 extension ("bf16" among the Features)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def fast_bf16(device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU of compute capability 8.0 (Ampere) or later;
    a CPU whose ``CPUINFO`` lists one of ``BF16_CPU_FLAGS`` (no such file: no). Elsewhere torch emulates
    bf16, and autocast costs time instead of saving it (3x for a ResNet-18 step on an AVX2 CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return True
    try:
        with open(CPUINFO) as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words.intersection(BF16_CPU_FLAGS))


def resolve_amp(amp: str, device, note: Optional[Callable[[str], None]] = None) -> str:
    """The one autocast policy (training, ``tools.bench``; predict and clean through ``inference_autocast``):
    bf16 on a device without fast bf16 (``fast_bf16``) falls back to off (float32), and ``note`` (default:
    print to stderr) says so; the caller records what it used. Any other mode is returned as it is."""
    if amp == "bf16" and not fast_bf16(device):
        _say(f"{device} has no fast bf16 (emulated, slower than float32): amp bf16 -> off", note)
        return "off"
    return amp


def require_backend(backend: str) -> str:
    """The loader's check: refuse a GPU backend on a machine without CUDA, with the fix in the message."""
    if backend == "dali-gpu":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("data.backend=dali-gpu needs a CUDA GPU, and none is visible here; "
                               "use data.backend=dali-cpu (decode on the CPU) on this machine")
    return backend


def drop_legacy_keys(data: dict) -> dict:
    """A saved ``data`` section without the keys of older versions (``LEGACY_KEYS``)."""
    return {k: v for k, v in data.items() if k not in LEGACY_KEYS}


__all__ = ["DataConfig", "BACKENDS", "SHUFFLES", "LEGACY_KEYS", "drop_legacy_keys", "resolve_backend", "require_backend",
           "fast_bf16", "resolve_amp"]
