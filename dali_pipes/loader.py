"""``build_loader``: the one entry point from a DATA directory (or nothing, for ``synthetic``) to batches.

    loader, steps_per_epoch = build_loader(cfg, rank, world_size, split, device=None, state=None,
                                           class_map=None, flip=False)

Backends ``dali-gpu`` (decode and augment on the GPU), ``dali-cpu`` (all on the CPU) and ``synthetic``
(random tensors made once on ``device``, to time the model alone) share this signature and these semantics:

* ``split == "train"``: shuffled, random crop + random flip; ``for images, labels in loader`` runs one epoch
  of exactly ``steps_per_epoch`` full batches. Any other split is evaluation: file order, centre crop
  (``cfg.eval_crop``) or the whole image, every image mirrored when ``flip=True`` (TTA), and
  ``for images, labels, meta in loader`` with ``meta = {"product_id", "image_index"}`` (int64; image_index
  is -1 for tiled products).
* ``text=True`` (a model with ``model.text_branch``): each batch also carries its pictures' OCR input, looked
  up in ``DATA/ocr`` (``tools.ocr``) by the batch's own ``(product_id, image_index)``, so it stays aligned
  through any order and any resume: ``(ids, offsets)`` int64 on the batch's device
  (``ocr_files.TextLookup``; a tiled record joins its pictures' words). Train then yields
  ``images, labels, text``; evaluation puts it in ``meta["text"]``. A missing, unfinished or foreign OCR
  directory is an ``OcrError`` that names the ``tools.ocr`` command to run.
* Images: ``uint8 (N, H, W, 3)``, RGB pixels as decoded (EXIF orientation applied), ``(H, W) =
  cfg.picture_hw(train)``: every picture is first resized so that its shorter side is ``cfg.image_size``
  (aspect ratio kept; pictures already that size are untouched), then cropped (and flipped) as above. Where
  the manifest records that every picture of the split is ``cfg.image_size`` square, the graph has no
  per-picture size check at all (``loader.resize_check`` is False); older DATA directories keep it. In that
  case dali-cpu decodes each picture's window only, mirrored where drawn, straight into the batch
  (``fn.window_decode``, ``dali_pipes.native``): same pixels.
  ``cfg.tiled_k`` in 1..4 reads the product shards and tiles the K crops: W x K (K=2, 3) or 2x2 (K=1:
  the single-image products, one picture each, as the upsized fine-tunes read them). The
  normalization (mean/std of the model's trunk, compute dtype, NCHW channels_last view) is the model's
  first step (``models.heads.Net.prepare_input``), on the training device. Labels: int64 ``(N,)``, -1 for
  unlabelled data. Synthetic batches have the same shapes, layout and dtype.
* Devices: dali-gpu yields images and labels on the pipeline's GPU; dali-cpu yields CPU tensors, copied
  to ``device`` if one is given (to a GPU: through page-locked memory, on a copy stream the current stream
  waits for, so the copy overlaps the step queued before); meta stays on the CPU.

Last batch. Shards are cut from the split's records as DALI does (rank r reads records
floor(r*N/W) .. floor((r+1)*N/W)) and padded to equal length with copies of their last record.
Train drops the incomplete last batch of each epoch: every rank runs the same ``(N // W) // batch_size``
steps (DDP needs that), no sample is repeated within an epoch and at most ``batch_size`` per rank are
left out. Order (``cfg.shuffle``): ``epoch`` (the default) gives every epoch its own order of all the
split's records, drawn from (``cfg.seed``, epoch) and the same on every rank, of which rank r reads the part
above (``dali_pipes.order``: a fresh reader per epoch on index files of that order), so each epoch a rank
reads another random part and a different few are left out; ``buffer`` reads the rank's shard in file order
through the shuffle buffer (``cfg.initial_fill``) alone, and each epoch a rank moves on to the next shard.
The loader reads each epoch's padded shard to its end, so the next epoch starts afresh (where W does not
divide N and ``batch_size`` divides ``N // W``, that end is a batch of padding copies only).
Evaluation drops the padding copies: over an epoch a rank yields each record of its shard exactly once,
the last batch may be shorter (a batch larger than the shard is fine: one short batch), and ranks may
yield different numbers of batches (at most one apart), so no collective may run inside an eval loop.

Resume. ``loader.state()`` between batches (or at epoch end) returns a plain dict (str, int, bytes, list,
dict only: safe for ``torch.load(weights_only=True)``) with this rank's DALI checkpoint (reader position,
shuffle buffer and random generators), the epoch and step, ``cfg.pipeline_signature()``, the backend,
split, rank and world size; a state that differs in any of these is refused with a ValueError that lists
the differences. ``build_loader(..., state=s)`` continues with the next batch: its first ``for``
yields the rest of that epoch. Once the last batch of an epoch has been handed out the loader has already
moved to the next epoch (state() then resumes at its first batch). Breaking out of a ``for`` keeps the
position; the next ``for`` continues the same epoch.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from typing import Iterator, List, Optional, Sequence

import torch

from .config import DataConfig, _say, require_backend
from .dataset import DatasetError, check_class_map, open_dataset
from .order import epoch_parts, scratch_root, write_epoch_index

# 3: data.shuffle=epoch, a reader per epoch on that epoch's order (2: one reader for all epochs; 1: the train
# iterator could leave a batch of padding for the next epoch)
STATE_VERSION = 3


class LoaderStateError(ValueError):
    """A ``state`` that does not fit this loader (another version, configuration, process count or graph).
    ``detail``: what differs, without the advice of the message (a caller that recovers says its own)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Records of the split that ``rank`` reads, as DALI's readers cut them."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


class _Loader:
    """What every backend shares: attributes, epoch/step counting and the checked state dict."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, split: str, flip: bool,
                 augment: Optional[bool] = None):
        self.cfg, self.rank, self.world_size, self.split, self.flip = cfg, rank, world_size, split, flip
        self.text = None  # TextLookup of the split (text=True)
        self.text_hashing = None  # the OCR directory's hashing of the words (the model's must be the same)
        self.text_settings = None  # ... and how tools.ocr read them (det_size, angle_cls)
        self.train = split == "train" if augment is None else bool(augment)
        self.epoch = 0
        self.step = 0  # batches handed out in the current epoch
        self.steps_per_epoch = 0
        self.num_samples = 0  # this rank's samples per epoch (train: steps x batch)
        self.num_classes = 0
        self.category_ids: List[int] = []
        self.num_records = 0  # records of the split (all ranks)
        self.graph = None  # DALI loaders: which graph reads the pictures (see DaliLoader)
        self.keep_ids = False  # train: keep the last batch's (product_id, image_index) in last_ids (tools.bench order)
        self.last_ids = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _identity(self) -> dict:
        # The backend too: a DALI checkpoint names the graph's operators, and the GPU graph differs.
        return {"signature": self.cfg.pipeline_signature(), "backend": self.cfg.backend, "graph": self.graph,
                "world_size": self.world_size, "rank": self.rank, "split": self.split, "flip": self.flip,
                "num_records": self.num_records}

    def _state(self, **extra) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch, "step": self.step, **extra}

    def _check_state(self, state: dict) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if isinstance(version, int) and version != STATE_VERSION:
            raise LoaderStateError(f"loader state of version {version}, from another version of the code (this "
                                   f"loader reads version {STATE_VERSION})")
        if version != STATE_VERSION:
            raise LoaderStateError("loader state: not a state from dali_pipes.loader (version "
                                   f"{version if isinstance(state, dict) else type(state).__name__}, "
                                   f"expected {STATE_VERSION})")
        mine, diffs = self._identity(), []
        for k, v in mine.items():
            if k == "graph" and k not in state:
                continue  # a state from before the field: DALI itself tells whether its operators match
            old = state.get(k)
            if k == "signature" and isinstance(old, dict):
                diffs += [f"data.{f}: saved {old.get(f)!r}, now {v.get(f)!r}" for f in sorted(set(v) | set(old))
                          if old.get(f) != v.get(f)]
            elif old != v:
                diffs.append(f"{k}: saved {old!r}, now {v!r}")
        if diffs:
            raise LoaderStateError("loader state was saved by a different pipeline configuration, so its reader "
                                   "position does not apply here (" + "; ".join(diffs) + "); resume with the data "
                                   "settings and process count the run started with, or start the epoch afresh "
                                   "without a state", detail="; ".join(diffs))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ---- DALI ------------------------------------------------------------------------------------------------
class DaliLoader(_Loader):
    def __init__(self, cfg: DataConfig, rank: int, world_size: int, split: str, device, state, class_map, flip,
                 augment=None, text=False):
        from .pipelines import graph_name

        super().__init__(cfg, rank, world_size, split, flip, augment)
        gpu = cfg.backend == "dali-gpu"
        ds = open_dataset(cfg.path)
        if class_map is not None and ds.category_ids:  # unlabelled test data has no class map to compare
            check_class_map(class_map, ds.category_ids, f"{cfg.path}/classes.csv vs the run's class map")
        self.category_ids = list(ds.category_ids or class_map or [])
        self.num_classes = len(self.category_ids)
        if text:  # the split's pictures (a tiled record's too: its pictures are in the same split's image shards)
            from .ocr_files import TextLookup, open_ocr

            ocr = open_ocr(ds, split)
            self.text, self.text_hashing, self.text_settings = TextLookup(ocr), ocr["hashing"], ocr["settings"]
        paths, idxs, counts = ds.shards(split, cfg.tiled_k)  # checks every .idx against its shard
        what = f"{cfg.path} split {split!r}" + (f" (products with K={cfg.tiled_k} images)" if cfg.tiled_k else "")
        n = self.num_records = sum(counts)
        share = len(shard_range(n, rank, world_size))
        # Train needs a full batch per rank (it drops incomplete ones); eval takes any shard but an empty one.
        if n // world_size == 0:
            raise DatasetError(f"{what} holds {n} records, fewer than the {world_size} process(es) reading it"
                               + ("" if n else "; repack with a larger --val-fraction or skip this split"))
        if self.train and n // world_size < cfg.batch_size:
            raise ValueError(f"{what}: {n} records over {world_size} process(es) leave {n // world_size} per "
                             f"process, fewer than data.batch_size={cfg.batch_size}; lower data.batch_size or "
                             "run fewer processes")
        if self.train:
            self.steps_per_epoch = (n // world_size) // cfg.batch_size
            self.num_samples = self.steps_per_epoch * cfg.batch_size
        else:
            self.steps_per_epoch = math.ceil(share / cfg.batch_size)
            self.num_samples = share

        if gpu:
            device = torch.device("cuda") if device is None else torch.device(device)
            if device.type != "cuda":
                raise ValueError(f"data.backend=dali-gpu puts batches on a CUDA device, not {device}")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        self.device = None if device is None else torch.device(device)
        to_cuda = not gpu and self.device is not None and self.device.type == "cuda"
        # dali-cpu feeding a GPU: crop and mirror there in DALI (data.gpu_augment), or the batch copied over
        self.gpu_augment = cfg.gpu_augment and to_cuda
        if self.gpu_augment and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if cfg.gpu_augment and not self.gpu_augment:
            _say(f"data.gpu_augment ignored: it crops and mirrors dali-cpu batches on the GPU they go to, and "
                  f"these {'are decoded on the GPU already' if gpu else 'stay on the CPU'} (the usual graph runs)", None)
        # the copies go on a stream of their own (see _convert)
        self._copy_stream = torch.cuda.Stream(self.device) if to_cuda and not self.gpu_augment else None
        self.tiled = bool(cfg.tiled_k)
        # The per-picture size check (a DALI conditional, ~5% of the CPU time) only where a picture may need it.
        self.resize_check = not ds.all_square(split, cfg.image_size)
        # Named in the state: a reader checkpoint fits only the graph it was taken from.
        self.graph = graph_name(cfg, self.resize_check, self.gpu_augment)
        if state is not None:
            self._check_state(state)
        # data.shuffle=epoch: each train epoch a fresh reader on that epoch's order (dali_pipes.order)
        self._by_epoch = self.train and cfg.shuffle == "epoch"
        self._files = (paths, idxs, counts)
        self._open(state["dali"] if state is not None else None)

    def _open(self, checkpoint) -> None:
        """The pipeline and iterator of the current epoch (data.shuffle=epoch) or of all epochs."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .pipelines import READER, build_pipeline, output_names

        cfg, rank = self.cfg, self.rank
        paths, idxs, counts = self._files
        seed, shard_id, num_shards = cfg.seed + 1_000_003 * rank, rank, self.world_size
        scratch = None
        if self._by_epoch:
            # The reader reads its index files when it is built: they are gone right after, even if this
            # process is killed later.
            parts = epoch_parts(counts, cfg.seed, self.epoch, rank, self.world_size)
            scratch = tempfile.mkdtemp(prefix="dali-pipes-order-", dir=scratch_root(sum(len(p) for _, p in parts)))
            paths, idxs = write_epoch_index(scratch, paths, idxs, parts)
            seed, shard_id, num_shards = seed + 7_919 * self.epoch, 0, 1  # the files hold this rank's part only
        try:
            self.pipe = build_pipeline(
                cfg, paths=paths, index_paths=idxs, train=self.train, flip=self.flip,
                device_id=self.device.index if cfg.backend == "dali-gpu" or self.gpu_augment else None,
                seed=seed % (1 << 31), shard_id=shard_id, num_shards=num_shards, checkpoint=checkpoint,
                resize_check=self.resize_check, gpu_augment=self.gpu_augment)
            # PARTIAL for train too: the iterator then reads every batch of the padded shard, and _finish_epoch
            # drops what is past steps_per_epoch. With DROP it leaves a batch of padding copies in the pipeline
            # where W does not divide N and batch_size divides N // W: the next epoch would start with it.
            self.it = DALIGenericIterator(
                self.pipe, output_names(cfg.tiled_k), reader_name=READER,
                auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as e:
            if checkpoint is None:
                raise
            dali = f"DALI: {str(e).splitlines()[0]}"
            raise LoaderStateError(f"loader state does not fit this pipeline ({dali}); it comes from another "
                                   "version of the code or of DALI: start the epoch afresh without it",
                                   detail=dali) from e
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def state(self) -> dict:
        return self._state(dali=bytes(self.it.checkpoints()[0]))

    def __iter__(self) -> Iterator[tuple]:
        while True:
            batch = next(self.it)[0]
            self.step += 1
            last = self.step == self.steps_per_epoch
            if last:
                self._finish_epoch()
            yield self._convert(batch)
            if last:
                return

    def _finish_epoch(self) -> None:
        """Run the DALI iterator to its end of epoch now, so that a state taken after the last batch (as
        the trainer does before leaving the loop) resumes at the next epoch's first batch. Train drops what
        is left: at most one batch, the incomplete last one (or one of padding only)."""
        left = 0
        while True:
            try:
                rest = next(self.it)[0]
            except StopIteration:
                break
            left += 1  # eval: only the empty rest of a shard padded past its own end
            if left > 1 or (rest["images"].shape[0] and not self.train):
                raise RuntimeError(f"loader {self.split}: DALI returned more than the {self.steps_per_epoch} "
                                   "batches expected per epoch; a bug in the step count")
        self.epoch += 1
        self.step = 0
        if self._by_epoch:
            del self.it, self.pipe
            self._open(None)

    def _convert(self, b: dict) -> tuple:
        images, labels = b["images"], b["labels"].view(-1)
        if self._copy_stream is not None:
            # dali-cpu feeding a GPU. From page-locked memory (a copy from pageable memory holds the host;
            # torch's caching host allocator keeps each page-locked block until its copy is done), on a
            # stream of its own: on the compute stream the copy would wait behind the step the trainer
            # queued before asking for this batch, and that stream would wait for the copy. The compute
            # stream waits for the copy instead, and the batch's memory is marked as used there (so the
            # allocator does not hand it to the next copy while a step still reads it).
            host = [images.pin_memory(), labels.pin_memory()]
            with torch.cuda.stream(self._copy_stream):
                images, labels = [t.to(self.device, non_blocking=True) for t in host]
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._copy_stream)
            images.record_stream(compute)
            labels.record_stream(compute)
        elif self.device is not None and images.device != self.device:
            images, labels = images.to(self.device), labels.to(self.device)
        pids = b["product_id"].view(-1)
        index = torch.full_like(pids, -1) if self.tiled else b["image_index"].view(-1)
        text = self._text(pids, index, images.device) if self.text is not None else None
        if self.train:
            if self.keep_ids:
                self.last_ids = (pids, index)
            return (images, labels) if text is None else (images, labels, text)
        meta = {"product_id": pids, "image_index": index}
        if text is not None:
            meta["text"] = text
        return images, labels, meta

    def _text(self, pids: torch.Tensor, index: torch.Tensor, device) -> tuple:
        """The batch's OCR input ``(ids, offsets)`` on ``device`` (the images')."""
        ids, offsets = self.text.batch(pids.numpy(), index.numpy())
        ids, offsets = torch.from_numpy(ids), torch.from_numpy(offsets)
        if device.type == "cuda":
            ids, offsets = (t.pin_memory().to(device, non_blocking=True) for t in (ids, offsets))
        return ids, offsets


# ---- synthetic -------------------------------------------------------------------------------------------
class SyntheticLoader(_Loader):
    """The same batch every step, made once on ``device``: the model's speed without any input cost."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, split: str, device, state, class_map, flip,
                 augment=None):
        super().__init__(cfg, rank, world_size, split, flip, augment)
        device = torch.device("cpu") if device is None else torch.device(device)
        self.num_classes = cfg.synthetic_num_classes
        self.category_ids = list(range(self.num_classes))  # stand-ins: there is no classes.csv
        if class_map is not None:
            check_class_map(class_map, self.category_ids, f"synthetic data ({self.num_classes} classes) vs the "
                            "run's class map")
        self.steps_per_epoch = cfg.synthetic_steps
        self.num_samples = self.num_records = cfg.synthetic_steps * cfg.batch_size
        if state is not None:
            self._check_state(state)
        g = torch.Generator().manual_seed(cfg.seed + rank)
        h, w = cfg.picture_hw(self.train)
        self.images = torch.randint(0, 256, (cfg.batch_size, h, w, 3), generator=g, dtype=torch.uint8).to(device)
        self.labels = torch.randint(0, self.num_classes, (cfg.batch_size,), generator=g).to(device)
        self.meta = {"product_id": torch.arange(cfg.batch_size, dtype=torch.int64),
                     "image_index": torch.zeros(cfg.batch_size, dtype=torch.int64)}

    def state(self) -> dict:
        return self._state()

    def __iter__(self) -> Iterator[tuple]:
        while True:
            self.step += 1
            last = self.step == self.steps_per_epoch
            if last:
                self.epoch, self.step = self.epoch + 1, 0
            yield (self.images, self.labels) if self.train else (self.images, self.labels, self.meta)
            if last:
                return


def build_loader(cfg: DataConfig, rank: int, world_size: int, split: str, device=None, state: Optional[dict] = None,
                 class_map: Optional[Sequence[int]] = None, flip: bool = False, augment: Optional[bool] = None,
                 text: bool = False):
    """``(loader, steps_per_epoch)``; see the module docstring for the contract. ``augment=False`` reads the
    train split as an evaluation split (file order, centre crop, every image once: ``tools.clean``);
    the default augments the train split only. ``text``: each batch carries its OCR input too."""
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if require_backend(cfg.backend) == "synthetic":
        if text:
            raise ValueError("the synthetic backend has no OCR text (a text branch needs a DATA directory)")
        loader = SyntheticLoader(cfg, rank, world_size, split, device, state, class_map, flip, augment)
    else:
        loader = DaliLoader(cfg, rank, world_size, split, device, state, class_map, flip, augment, text)
    return loader, loader.steps_per_epoch
