"""DALI pipelines: read TFRecord shards, decode on the CPU or the GPU, crop, flip, normalize, tile.

One graph builder serves every case: single images (train or eval) and tiled products (K=2, 3, 4), with
the decode on ``cpu`` or ``mixed`` (GPU: nvImageCodec, hardware JPEG decoder where there is one). The
only device-specific parts are the decoder's ``device`` (plus its hardware-decoder arguments) and moving
the labels to the GPU; every later operator follows its input's device. So the CPU tests run the graph
the GPU uses.

Per image: decode the whole JPEG, then one ``crop_mirror_normalize`` does crop + flip + normalize + layout +
dtype. A region-of-interest decode (``decoders.image_crop``) measured about 30% slower on the CPU for
180x180 JPEGs than the whole decode, and the hardware decoder works on whole images.
"""
from __future__ import annotations

from typing import Optional, Sequence

from nvidia.dali import fn, pipeline_def, types

from . import records

READER = "Reader"  # the reader's name: DALIGenericIterator takes the epoch size and padding from it
DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}  # bf16: torch casts


def _crop_one(jpegs, *, decode_device: str, train: bool, flip: bool, size: int, mean, std, dtype, layout: str,
              hw_decoder_load: float, image_size: int):
    """Decode one JPEG per sample and return (picture, crop_x, crop_y, mirror)."""
    if train:
        # Seeded from the pipeline seed; DALI checkpoints their generator state, so a resumed run draws the
        # same crops and flips as an uninterrupted one.
        px = fn.random.uniform(range=(0.0, 1.0))
        py = fn.random.uniform(range=(0.0, 1.0))
        mirror = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
    else:
        px = py = 0.5  # centre
        mirror = 1 if flip else 0
    # GPU only: the share of JPEGs for the hardware decoder (A100/H100), and its buffers sized up front.
    gpu_args = dict(hw_decoder_load=hw_decoder_load, preallocate_width_hint=image_size,
                    preallocate_height_hint=image_size) if decode_device == "mixed" else {}
    img = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **gpu_args)
    # "pad": an image smaller than the window is padded with zeros instead of stopping a long run; every
    # Cdiscount image is 180x180, so this never happens on the real data.
    out = fn.crop_mirror_normalize(img, crop=(size, size), crop_pos_x=px, crop_pos_y=py, mirror=mirror,
                                   mean=list(mean), std=list(std), dtype=dtype, output_layout=layout,
                                   out_of_bounds_policy="pad")
    return out, px, py, mirror


def _tile(tiles, k: int):
    """K=2, 3: a horizontal strip; K=4: a 2x2 grid (row-major: image_0 image_1 / image_2 image_3)."""
    if k == 4:
        top = fn.cat(tiles[0], tiles[1], axis_name="W")
        bottom = fn.cat(tiles[2], tiles[3], axis_name="W")
        return fn.cat(top, bottom, axis_name="H")
    return fn.cat(*tiles, axis_name="W")


def _graph(*, paths, index_paths, tiled_k, train, flip, decode_device, size, image_size, mean, std, dtype, layout,
           shard_id, num_shards, initial_fill, hw_decoder_load, with_params):
    schema = records.product_features(tiled_k) if tiled_k else records.IMAGE_FEATURES
    r = fn.readers.tfrecord(
        path=list(paths), index_path=list(index_paths), features=records.dali_features(schema), name=READER,
        shard_id=shard_id, num_shards=num_shards,
        random_shuffle=train, initial_fill=initial_fill,
        # Every shard is padded to the same length with copies of its last record; the iterator drops the
        # copies (eval) or the incomplete last batch (train), so no sample is counted twice.
        pad_last_batch=True,
        # Train: each epoch a rank moves on to the next shard (more mixing). Eval: a rank keeps its shard.
        stick_to_shard=not train)
    names = [f"image_{i}" for i in range(tiled_k)] if tiled_k else ["image"]
    parts = [_crop_one(r[n], decode_device=decode_device, train=train, flip=flip, size=size, mean=mean, std=std,
                       dtype=dtype, layout=layout, hw_decoder_load=hw_decoder_load, image_size=image_size)
             for n in names]
    images = _tile([p[0] for p in parts], tiled_k) if tiled_k else parts[0][0]
    labels = r["label"].gpu() if decode_device == "mixed" else r["label"]
    outs = [images, labels, r["product_id"]]
    if not tiled_k:
        outs.append(r["image_index"])
    if with_params:  # for tests: the random crop positions and flips drawn (train), one row per tile
        for j in (1, 2, 3):
            outs.append(fn.stack(*[fn.cast(p[j], dtype=types.FLOAT) for p in parts]))
    return tuple(outs)


_pipeline = pipeline_def(_graph)


def output_names(tiled_k: int, with_params: bool = False):
    names = ["images", "labels", "product_id"] + ([] if tiled_k else ["image_index"])
    return names + (["crop_x", "crop_y", "mirror"] if with_params else [])


def build_pipeline(*, paths: Sequence[str], index_paths: Sequence[str], tiled_k: int, train: bool,
                   decode_device: str, batch_size: int, num_threads: int, device_id: Optional[int], seed: int,
                   prefetch: int, crop: int, image_size: int, eval_crop: bool = True, flip: bool = False,
                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), dtype: str = "float32", channels_last: bool = False,
                   shard_id: int = 0, num_shards: int = 1, initial_fill: int = 4096, hw_decoder_load: float = 0.65,
                   checkpoint=None, with_params: bool = False):
    """A built pipeline yielding ``output_names(tiled_k, with_params)``.

    ``decode_device``: "cpu" (every operator on the CPU, ``device_id=None``) or "mixed" (GPU decode and ops;
    labels are moved to the GPU too). ``train``: shuffle, random crop position and random flip; otherwise
    centre crop (or the whole image with ``eval_crop=False``) and ``flip`` mirrors every image (TTA).
    ``checkpoint``: a ``pipeline.checkpoint()`` / iterator checkpoint to resume from."""
    if decode_device not in ("cpu", "mixed"):
        raise ValueError(f"decode_device must be 'cpu' or 'mixed', not {decode_device!r}")
    if with_params and not train:
        raise ValueError("with_params reads back random draws: train pipelines only")
    if decode_device == "mixed" and device_id is None:
        raise ValueError("decode_device='mixed' needs a CUDA device_id")
    size = crop if (train or eval_crop) else image_size
    pipe = _pipeline(
        paths=paths, index_paths=index_paths, tiled_k=tiled_k, train=train, flip=flip, decode_device=decode_device,
        size=size, image_size=image_size, mean=mean, std=std, dtype=DALI_DTYPES[dtype],
        layout="HWC" if channels_last else "CHW", shard_id=shard_id, num_shards=num_shards,
        initial_fill=initial_fill, hw_decoder_load=hw_decoder_load, with_params=with_params,
        batch_size=batch_size, num_threads=num_threads, device_id=device_id if decode_device == "mixed" else None,
        seed=seed, prefetch_queue_depth=prefetch,
        # The dynamic executor hands outputs to torch without a copy (DLPack); checkpointing records the
        # reader position and the random generators for mid-epoch resume.
        exec_dynamic=True, enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe
