"""Configuration of the data path: one typed dataclass shared by the loader, the trainer and the tools."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

BACKENDS = ("dali-gpu", "dali-cpu", "synthetic")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class DataConfig:
    path: str = ""  # a repacked DATA directory (tools.repack); ignored by the synthetic backend
    backend: str = "dali-cpu"  # dali-gpu | dali-cpu | synthetic
    batch_size: int = 64  # per GPU / per process
    image_size: int = 180  # side of the stored images
    crop: int = 160  # side of the random (train) or center (eval) crop
    eval_crop: bool = True  # eval: center crop of `crop` (True) or the full image (False)
    tiled_k: int = 0  # 0: image shards; 2..4: tiled product shards products/k{K}
    num_threads: int = 4  # DALI CPU threads per pipeline
    prefetch: int = 2  # DALI prefetch queue depth
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100), dali-gpu only
    initial_fill: int = 4096  # shuffle buffer of the reader
    dtype: str = "float32"  # output dtype of the images
    channels_last: bool = False  # NHWC output instead of NCHW
    # ImageNet's mean and std (0.485, 0.456, 0.406 and 0.229, 0.224, 0.225) x 255, as YAML prints them
    mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    seed: int = 42
    synthetic_num_classes: int = 1000  # synthetic backend only (no DATA to read the class count from)
    synthetic_steps: int = 100  # synthetic backend: steps per epoch

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"data.dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.crop > self.image_size:
            raise ValueError(f"data.crop ({self.crop}) is larger than data.image_size ({self.image_size})")
        if self.tiled_k not in (0, 2, 3, 4):
            raise ValueError(f"data.tiled_k must be 0 (single images) or 2, 3, 4, not {self.tiled_k}")
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")

    def pipeline_signature(self) -> dict:
        """The settings that decide which samples a reader yields in which order.

        A DALI reader checkpoint is only valid for a pipeline with the same signature."""
        return {
            "backend_kind": "synthetic" if self.backend == "synthetic" else "dali",
            "batch_size": self.batch_size,
            "tiled_k": self.tiled_k,
            "initial_fill": self.initial_fill,
            "seed": self.seed,
            "crop": self.crop,
            "image_size": self.image_size,
        }


def resolve_backend(backend: str) -> str:
    """Refuse a GPU backend on a machine without CUDA, with the fix in the message."""
    if backend == "dali-gpu":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("data.backend=dali-gpu needs a CUDA GPU, and none is visible here; "
                               "use data.backend=dali-cpu (decode on the CPU) on this machine")
    return backend


__all__ = ["DataConfig", "BACKENDS", "DTYPES", "resolve_backend"]
