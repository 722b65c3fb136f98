"""DALI pipelines: read TFRecord shards, decode on the CPU or the GPU, resize odd sizes, crop, flip, tile.

One graph builder serves every case: single images (train or eval) and tiled products (K=2, 3, 4), with
the decode on ``cpu`` (``data.backend=dali-cpu``) or ``mixed`` (``dali-gpu``: nvImageCodec, hardware JPEG
decoder where there is one). The only device-specific parts are the decoder's ``device`` (plus its
hardware-decoder arguments) and moving the labels to the GPU; every later operator follows its input's
device. So the CPU tests run the graph the GPU uses.

Per picture: decode the JPEG (EXIF orientation applied), resize it so that its shorter side is
``data.image_size`` (aspect ratio kept) where it is not already, then one ``crop_mirror_normalize`` cuts the
window and mirrors it, staying uint8 HWC: the output is 1 byte per value, and the normalization to the
model's mean, std and dtype runs on the training device inside the model (``models.heads.Net``). The resize
is a per-sample conditional, so pictures of the right size skip it; where the repack's manifest says that
every picture of the split is already ``image_size`` x ``image_size`` (all of the Cdiscount data), the loader
builds the graph without the check and its conditional (``resize_check=False``).

On the CPU, in that all-square case, one operator of this project decodes each picture's window straight into
the batch, mirrored where drawn (``fn.window_decode``, ``dali_pipes/native``: libjpeg-turbo skips the rows
above the window, decodes its rows one by one into a row buffer that stays in the cache, copies the window's
columns from it, reversed where mirrored, and stops after the window's last row). DALI's own decoder always
decodes into a buffer of its own and copies the rows into the batch, and its CPU crop and mirror operators
cost about half a decode per 160x160 picture (BENCHMARKS.md). The pixels are those of the whole-picture graph,
pixel for pixel, and so are the draws (the same random operators in the same order). Where the operator
cannot be built (no C++ compiler or libjpeg headers), the CPU runs the whole-picture graph and says why. The
GPU graph keeps the fused ``crop_mirror_normalize`` (one cheap kernel there, and the hardware decoder works
on whole images).

Two GPU graphs are choices (``graph_name``), to be measured by ``bench tune``: ``data.gpu_augment`` (dali-cpu
batches that go to a GPU: the CPU reads and decodes whole pictures, an in-pipeline ``.gpu()``, and the fused
crop and mirror run on the GPU in DALI, as NVIDIA's ResNet-50 example does) and ``data.gpu_decoder_crop``
(dali-gpu on all-square shards: ``decoders.image_crop`` on the GPU cuts the window, the mirror follows).
"""
from __future__ import annotations

from typing import Optional, Sequence

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from . import records
from .config import DataConfig, _say, tile_grid

READER = "Reader"  # the reader's name: DALIGenericIterator takes the epoch size and padding from it


def _fit(img, side: int):
    """``img`` with its shorter side resized to ``side`` (aspect ratio kept) where it differs; other pictures
    pass through untouched (a resize of a same-size picture would still resample it, at 3x the decode's
    cost). Downscaling is antialiased."""
    hw = img.shape()  # (H, W, C), after the EXIF orientation
    short = dmath.min(hw[0], hw[1])
    if short != side:
        img = fn.resize(img, resize_shorter=side, antialias=True)
    return img


_noted = False


def _window_decoder() -> bool:
    """Whether ``fn.window_decode`` is loaded (built first where it is missing); says once per process why
    not where it cannot be had."""
    from .native import window_decoder

    global _noted
    ok, why = window_decoder()
    if not ok and not _noted:
        _noted = True
        _say(f"dali-cpu: the window decoder is not available ({why}); the loader decodes whole pictures and "
             "crops them in DALI (about twice the CPU time per picture). `python -m dali_pipes.native` builds it",
             None)
    return ok


def graph_name(cfg: DataConfig, resize_check: bool, gpu_augment: bool = False) -> str:
    """Which graph reads the pictures, the name a loader state records (a reader position fits only its own
    graph). ``gpu_augment``: the dali-cpu batches go to a GPU and ``cfg.gpu_augment`` asked for it there."""
    if gpu_augment:
        return "gpu-augment"
    if resize_check:
        return "size-check"
    if cfg.backend == "dali-cpu" and _window_decoder():
        return "window-decode"
    if cfg.backend == "dali-gpu" and cfg.gpu_decoder_crop:
        return "gpu-decoder-crop"
    return "whole-picture"


def _picture(jpegs, *, decode_device: str, train: bool, flip: bool, size: int, image_size: int,
             gpu_args: dict, resize_check: bool, window: bool, to_gpu: bool, gpu_roi: bool):
    """Decode one JPEG per sample and return (uint8 HWC picture, crop_x, crop_y, mirror). ``window``: the
    window decoder cuts and mirrors; ``to_gpu``: CPU decode, then the crop and mirror on the GPU; ``gpu_roi``:
    the GPU decoder cuts the window."""
    if train:
        # Seeded from the pipeline seed; DALI checkpoints their generator state, so a resumed run draws the
        # same crops and flips as an uninterrupted one. Every graph creates them in this order, before any
        # operator that reads them, so they get the same seeds (the same crops) in each.
        px = fn.random.uniform(range=(0.0, 1.0))
        py = fn.random.uniform(range=(0.0, 1.0))
        mirror = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
    else:
        px = py = 0.5  # centre
        mirror = 1 if flip else 0
    if window:
        img = fn.window_decode(jpegs, window=(size, size), crop_pos_x=px, crop_pos_y=py, mirror=mirror)
        return img, px, py, mirror
    if gpu_roi:  # the window from the GPU decoder; the mirror alone after it
        img = fn.decoders.image_crop(jpegs, device="mixed", output_type=types.RGB, crop=(size, size),
                                     crop_pos_x=px, crop_pos_y=py, **gpu_args)
        out = fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.UINT8, output_layout="HWC")
        return out, px, py, mirror
    img = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **gpu_args)
    if resize_check:
        img = _fit(img, image_size)
    if to_gpu:
        img = img.gpu()
    # After _fit (or with every picture image_size square) both sides are >= image_size >= size, so the
    # window always fits; "pad" only guards a rounding corner case (zeros instead of a stopped run).
    out = fn.crop_mirror_normalize(img, crop=(size, size), crop_pos_x=px, crop_pos_y=py, mirror=mirror,
                                   dtype=types.UINT8, output_layout="HWC", out_of_bounds_policy="pad")
    return out, px, py, mirror


def _tile(tiles, k: int):
    """The K pictures laid out as ``tile_grid(k)`` says: side by side along W within a row, rows along H."""
    rows, cols = tile_grid(k)
    strips = [fn.cat(*tiles[r * cols:(r + 1) * cols], axis_name="W") for r in range(rows)]
    return strips[0] if rows == 1 else fn.cat(*strips, axis_name="H")


def _graph(*, paths, index_paths, tiled_k, train, flip, decode_device, size, image_size, shard_id, num_shards,
           initial_fill, gpu_args, with_params, resize_check, window, to_gpu, gpu_roi):
    schema = records.product_features(tiled_k) if tiled_k else records.IMAGE_FEATURES
    r = fn.readers.tfrecord(
        path=list(paths), index_path=list(index_paths), features=records.dali_features(schema), name=READER,
        shard_id=shard_id, num_shards=num_shards,
        random_shuffle=train, initial_fill=initial_fill,
        # Every shard is padded to the same length with copies of its last record; the iterator drops the
        # copies (eval), the loader the incomplete last batch (train), so no sample is counted twice.
        pad_last_batch=True,
        # Train: each epoch a rank moves on to the next shard (more mixing). Eval: a rank keeps its shard.
        stick_to_shard=not train)
    names = [f"image_{i}" for i in range(tiled_k)] if tiled_k else ["image"]
    parts = [_picture(r[n], decode_device=decode_device, train=train, flip=flip, size=size, image_size=image_size,
                      gpu_args=gpu_args, resize_check=resize_check, window=window, to_gpu=to_gpu, gpu_roi=gpu_roi)
             for n in names]
    images = [_tile([p[0] for p in parts], tiled_k) if tiled_k else parts[0][0]]
    labels = r["label"].gpu() if decode_device == "mixed" or to_gpu else r["label"]
    outs = images + [labels, r["product_id"]]
    if not tiled_k:
        outs.append(r["image_index"])
    if with_params:  # for tests: the random crop positions and flips drawn (train), one row per tile
        for j in (1, 2, 3):
            outs.append(fn.stack(*[fn.cast(p[j], dtype=types.FLOAT) for p in parts]))
    return tuple(outs)


_pipeline = pipeline_def(_graph, enable_conditionals=True)
_pipeline_no_check = pipeline_def(_graph)  # resize_check=False: no conditional anywhere in the graph


def output_names(tiled_k: int, with_params: bool = False):
    """The outputs' names in order."""
    names = ["images", "labels", "product_id"] + ([] if tiled_k else ["image_index"])
    return names + (["crop_x", "crop_y", "mirror"] if with_params else [])


def build_pipeline(cfg: DataConfig, *, paths: Sequence[str], index_paths: Sequence[str], train: bool,
                   flip: bool = False, device_id: Optional[int] = None, seed: Optional[int] = None,
                   shard_id: int = 0, num_shards: int = 1, checkpoint=None, with_params: bool = False,
                   resize_check: bool = True, gpu_augment: bool = False):
    """A built pipeline yielding ``output_names(cfg.tiled_k, with_params)``; images are uint8 ``(H, W, 3)`` per
    sample, ``cfg.picture_hw(train)``, mirrored where drawn (or where ``flip``).

    The data settings come from ``cfg`` (``backend``: dali-cpu decodes on the CPU, dali-gpu on GPU
    ``device_id`` with labels moved there too; ``batch_size``, ``num_threads``, ``prefetch``, ``tiled_k``,
    ``image_size``, ``crop``, ``eval_crop``, ``initial_fill``, ``hw_decoder_load``; ``seed`` unless given).
    ``paths``/``index_paths``: the shards of one split. ``train``: shuffle, random crop position and random
    flip; otherwise centre crop (or the whole image with ``eval_crop=False``) and ``flip`` mirrors every
    image (TTA). ``shard_id``/``num_shards``: this rank's part. ``checkpoint``: a ``pipeline.checkpoint()`` /
    iterator checkpoint to resume from. ``with_params`` (train, for tests) adds the random draws.
    ``resize_check=False`` leaves the per-picture size check and its resize out of the graph: only for shards
    whose every picture is ``image_size`` x ``image_size`` (``Dataset.all_square``), others would be cropped or
    padded instead of resized. ``has_resize_check(pipe)`` tells which graph a pipeline runs. ``gpu_augment``
    (dali-cpu with a ``device_id``): crop and mirror on that GPU, images and labels yielded there. The
    dali-gpu decoder takes ``cfg.decoder_affine``, ``cfg.bytes_per_sample_hint`` and, without the size check,
    ``cfg.gpu_decoder_crop`` (``graph_name`` names the graph)."""
    if cfg.backend not in ("dali-cpu", "dali-gpu"):
        raise ValueError(f"build_pipeline: data.backend must be dali-cpu or dali-gpu, not {cfg.backend!r}")
    gpu = cfg.backend == "dali-gpu"
    if with_params and not train:
        raise ValueError("with_params reads back random draws: train pipelines only")
    if gpu and device_id is None:
        raise ValueError("data.backend=dali-gpu needs a CUDA device_id")
    if gpu_augment and (gpu or device_id is None):
        raise ValueError("gpu_augment: dali-cpu batches cropped and mirrored on a GPU, so it needs data.backend="
                         f"dali-cpu (not {cfg.backend}) and a CUDA device_id (given: {device_id})")
    graph = graph_name(cfg, resize_check, gpu_augment)
    # GPU decoder only: the share of JPEGs for the hardware decoder (A100/H100), its buffers sized up front.
    gpu_args = {}
    if gpu:
        gpu_args = dict(hw_decoder_load=cfg.hw_decoder_load, preallocate_width_hint=cfg.image_size,
                        preallocate_height_hint=cfg.image_size, affine=cfg.decoder_affine)
        if cfg.bytes_per_sample_hint:
            gpu_args["bytes_per_sample_hint"] = cfg.bytes_per_sample_hint
    pipe = (_pipeline if resize_check else _pipeline_no_check)(
        paths=paths, index_paths=index_paths, tiled_k=cfg.tiled_k, train=train, flip=flip,
        decode_device="mixed" if gpu else "cpu", size=cfg.picture_side(train), image_size=cfg.image_size,
        shard_id=shard_id, num_shards=num_shards, initial_fill=cfg.initial_fill,
        gpu_args=gpu_args, with_params=with_params, resize_check=resize_check,
        window=graph == "window-decode", to_gpu=gpu_augment, gpu_roi=graph == "gpu-decoder-crop",
        batch_size=cfg.batch_size, num_threads=cfg.num_threads,
        device_id=device_id if gpu or gpu_augment else None,
        seed=cfg.seed if seed is None else seed, prefetch_queue_depth=cfg.prefetch,
        # The dynamic executor hands outputs to torch without a copy (DLPack); checkpointing records the
        # reader position and the random generators for mid-epoch resume.
        exec_dynamic=True, enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe


def has_resize_check(pipe) -> bool:
    """Whether a built pipeline's graph holds a resize (``_fit``'s), read from its serialized graph."""
    return b"Resize" in pipe.serialize()
