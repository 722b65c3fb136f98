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

On the CPU, in that all-square case, the decoder decodes only the rows of the crop window, across the whole
width (``decoders.image_crop`` with the window's height and the picture's width: no column realignment), and
the consumer cuts the columns and mirrors (``cut_windows``, one copy per picture in torch): the graph's
outputs are those rows, the window's ``window_x`` draw and a ``flip`` flag, one per tile. DALI's CPU crop
and mirror operators cost about half a decode per 160x160 picture (generic per-value kernels), and a window
cut in the decoder costs more than the whole decode: libjpeg-turbo's colour conversion writes 32-byte aligned
rows with non-temporal stores, and the decoder's realignment of each cropped row then reads it back from
memory (BENCHMARKS.md). The pixels are those of the whole-picture graph, pixel for pixel. The GPU graph keeps
the fused ``crop_mirror_normalize`` (one cheap kernel there, and the hardware decoder works on whole images).

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
from .config import DataConfig, tile_grid

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


def crops_in_consumer(backend: str, resize_check: bool, gpu_augment: bool = False) -> bool:
    """Whether the graph decodes the window's rows only and leaves the columns and the mirror to
    ``cut_windows``: CPU decoding of pictures that need no resize (a resize must come before the crop),
    unless the crop and mirror run on the GPU in DALI (``gpu_augment``)."""
    return backend == "dali-cpu" and not resize_check and not gpu_augment


def graph_name(cfg: DataConfig, resize_check: bool, gpu_augment: bool = False) -> str:
    """Which graph reads the pictures, the name a loader state records (a reader position fits only its own
    graph). ``gpu_augment``: the dali-cpu batches go to a GPU and ``cfg.gpu_augment`` asked for it there."""
    if gpu_augment:
        return "gpu-augment"
    if crops_in_consumer(cfg.backend, resize_check):
        return "consumer-crop"
    if resize_check:
        return "size-check"
    if cfg.backend == "dali-gpu" and cfg.gpu_decoder_crop:
        return "gpu-decoder-crop"
    return "whole-picture"


def _picture(jpegs, *, decode_device: str, train: bool, flip: bool, size: int, image_size: int,
             gpu_args: dict, resize_check: bool, roi: bool, to_gpu: bool, gpu_roi: bool):
    """Decode one JPEG per sample and return (uint8 HWC picture, crop_x, crop_y, mirror); in the
    ``crops_in_consumer`` graph (``roi``) the picture is the window's rows at full width, not mirrored yet.
    ``to_gpu``: CPU decode, then the crop and mirror on the GPU; ``gpu_roi``: the GPU decoder cuts the window."""
    if train:
        # Seeded from the pipeline seed; DALI checkpoints their generator state, so a resumed run draws the
        # same crops and flips as an uninterrupted one.
        px = fn.random.uniform(range=(0.0, 1.0))
        py = fn.random.uniform(range=(0.0, 1.0))
        # uint8 where it becomes the flip output itself (no cast, and for a picture no stack); int32 where
        # crop_mirror_normalize reads it.
        mirror = fn.random.coin_flip(probability=0.5, dtype=types.UINT8 if roi else types.INT32)
    else:
        px = py = 0.5  # centre
        mirror = 1 if flip else 0
    if roi:
        if not train:  # per-sample values, for the window_x and flip outputs
            px = fn.constant(fdata=px, shape=[])
            mirror = fn.constant(idata=int(flip), shape=[], dtype=types.UINT8)
        # The rows of the window, every column: the decoder skips the rows outside it and writes each row
        # where it goes (a window narrower than the picture would pass every row through a scratch buffer).
        # A full-width window puts px nowhere; the decoder takes it so that the graph reaches the draws in
        # the order crop_mirror_normalize does, which gives them the same seeds (the same crops).
        img = fn.decoders.image_crop(jpegs, device="cpu", output_type=types.RGB, crop=(size, image_size),
                                     crop_pos_x=px, crop_pos_y=py)
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


def window_anchor(pos, room: int):
    """The window's first column (or row) for ``pos`` in [0, 1] and ``room`` = picture side - window side,
    rounded as DALI's crop operators round it (half away from zero): int64, same shape as ``pos``."""
    v = pos.double() * room
    a = v.floor()
    return (a + (v - a >= 0.5).double()).long()


def cut_windows(pictures, window_x, flags, tiled_k: int, side: int, batched=None):
    """The batch that the ``crops_in_consumer`` graph leaves for the consumer to finish: from each picture's
    rows (``pictures``: one uint8 ``(N, side, W, 3)`` tensor per tile, the graph's ``images`` output or
    its ``images_<t>`` outputs), the ``side`` columns from ``window_anchor(window_x, W - side)``, mirrored
    where ``flags`` says, laid out as ``_tile`` lays them (``tile_grid(tiled_k)``). ``window_x`` and ``flags``:
    ``(N, max(1, tiled_k))`` (or ``(N,)``). On the CPU one copy per picture (a flip and a copy where it is
    mirrored); on a GPU (``batched``, the default there) one gather per tile position."""
    import torch

    rows, cols = tile_grid(tiled_k)
    n, width = pictures[0].shape[0], pictures[0].shape[2]
    out = pictures[0].new_empty((n, rows * side, cols * side, 3))
    anchors = window_anchor(window_x.view(n, -1), width - side)
    flags = flags.view(n, -1)
    places = [(side * (t // cols), side * (t % cols)) for t in range(len(pictures))]
    if pictures[0].is_cuda if batched is None else batched:
        anchors, flags = anchors.to(out.device), flags.to(out.device, non_blocking=True).bool()
        every = torch.arange(n, device=out.device)
        for t, (pic, (y, x)) in enumerate(zip(pictures, places)):
            s = pic.stride()
            windows = pic.as_strided((n, width - side + 1, side, side, 3), (s[0], s[2], s[1], s[2], s[3]))
            w = windows[every, anchors[:, t]]
            out[:, y:y + side, x:x + side] = w.flip(2).where(flags[:, t].view(-1, 1, 1, 1), w)
        return out
    # On one torch thread: a picture is just above torch's parallel grain, and the OpenMP team woken for each
    # spins on the cores DALI's threads decode on (the loader ran at 0.6-0.7x on 2 cores). The setting is
    # process-wide and back as it was when this returns (the loader's consumer does nothing meanwhile).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t, (pic, (y, x)) in enumerate(zip(pictures, places)):
            dest = out[:, y:y + side, x:x + side]
            for src, dst, a, f in zip(pic.unbind(0), dest.unbind(0), anchors[:, t].tolist(), flags[:, t].tolist()):
                w = src.narrow(1, a, side)
                dst.copy_(w.flip(1) if f else w)
    finally:
        torch.set_num_threads(threads)
    return out


def _graph(*, paths, index_paths, tiled_k, train, flip, decode_device, size, image_size, shard_id, num_shards,
           initial_fill, gpu_args, with_params, resize_check, roi, to_gpu, gpu_roi):
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
                      gpu_args=gpu_args, resize_check=resize_check, roi=roi, to_gpu=to_gpu, gpu_roi=gpu_roi)
             for n in names]
    if roi:  # crops_in_consumer: each tile's rows, tiled by cut_windows
        images = [p[0] for p in parts]
    else:
        images = [_tile([p[0] for p in parts], tiled_k) if tiled_k else parts[0][0]]
    labels = r["label"].gpu() if decode_device == "mixed" or to_gpu else r["label"]
    outs = images + [labels, r["product_id"]]
    if not tiled_k:
        outs.append(r["image_index"])
    if roi:  # crops_in_consumer: the window positions and the mirror flags (uint8), one per tile
        for j in (1, 3):
            outs.append(fn.stack(*[p[j] for p in parts]) if tiled_k else parts[0][j])
    if with_params:  # for tests: the random crop positions and flips drawn (train), one row per tile
        for j in (1, 2, 3):
            outs.append(fn.stack(*[fn.cast(p[j], dtype=types.FLOAT) for p in parts]))
    return tuple(outs)


_pipeline = pipeline_def(_graph, enable_conditionals=True)
_pipeline_no_check = pipeline_def(_graph)  # resize_check=False: no conditional anywhere in the graph


def picture_names(tiled_k: int, consumer_crop: bool = False):
    """The pictures' outputs: ``images``, or one per tile (``images_<t>``) where the graph is
    ``crops_in_consumer``'s and ``cut_windows`` tiles them."""
    return [f"images_{t}" for t in range(tiled_k)] if consumer_crop and tiled_k else ["images"]


def output_names(tiled_k: int, with_params: bool = False, consumer_crop: bool = False):
    """The outputs' names in order; ``consumer_crop``: the graph is ``crops_in_consumer``'s (the pictures'
    rows, then ``window_x`` and ``flip``, for ``cut_windows``)."""
    names = picture_names(tiled_k, consumer_crop) + ["labels", "product_id"] + ([] if tiled_k else ["image_index"])
    names += ["window_x", "flip"] if consumer_crop else []
    return names + (["crop_x", "crop_y", "mirror"] if with_params else [])


def build_pipeline(cfg: DataConfig, *, paths: Sequence[str], index_paths: Sequence[str], train: bool,
                   flip: bool = False, device_id: Optional[int] = None, seed: Optional[int] = None,
                   shard_id: int = 0, num_shards: int = 1, checkpoint=None, with_params: bool = False,
                   resize_check: bool = True, gpu_augment: bool = False):
    """A built pipeline yielding ``output_names(cfg.tiled_k, with_params, crops_in_consumer(cfg.backend,
    resize_check, gpu_augment))``; images are uint8 ``(H, W, 3)`` per sample, ``cfg.picture_hw(train)``,
    mirrored where drawn (or where ``flip``), except in the ``crops_in_consumer`` graph, whose pictures are
    the windows' rows at full width, and ``cut_windows`` makes the batch from them, ``window_x`` and ``flip``.

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
        roi=graph == "consumer-crop", to_gpu=gpu_augment, gpu_roi=graph == "gpu-decoder-crop",
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
