"""NVIDIA DALI input pipeline (`--loader dali`): decoding and the paper's augmentation in
DALI, on the GPU when there is one (`device="mixed"` decoding, GPU ops after it), on the
CPU otherwise (`device_id=None`).

The pipeline does the pixel work; the host only says which images form a batch and how
each is cropped and flipped. That plan is `fastres.data.augmentation`, shared with the torch
loader, so both loaders feed the same batches: a full seeded reshuffle every epoch (not
DALI's local shuffle buffer), disjoint shards per process, exact resume mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastres import recipe
from fastres.data import augmentation
from fastres.data.dataset import EncodedSplit, Split
from fastres.errors import UsageError
from fastres.runtime import dali_package

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError:  # DALI is optional: Linux only, and large
    fn = None

Batch = tuple[torch.Tensor, torch.Tensor]
OUTPUTS = ["images", "labels"]
NUM_THREADS = 4


def require_dali() -> None:
    if fn is None:
        raise UsageError(f"--loader dali needs NVIDIA DALI (Linux: pip install {dali_package()}, the build of "
                         "this torch's CUDA); or use --loader torch")


class _BatchSource:
    """DALI external source: batch `info.iteration` of epoch `first_epoch + info.epoch_idx`.

    It returns, per batch, the images (encoded files, or uint8 HWC arrays, on the GPU when
    the split lives there), the labels, the crop offsets (dy, dx) and the flips. DALI may
    call it past the end of an epoch while prefetching; it raises StopIteration there.
    """

    def __init__(self, images: list[np.ndarray] | np.ndarray | torch.Tensor, labels: np.ndarray,
                 batch_size: int, train: bool, seed: int, shard_id: int, num_shards: int) -> None:
        self.images, self.labels, self.batch_size, self.train = images, labels, batch_size, train
        self.seed, self.shard_id, self.num_shards = seed, shard_id, num_shards
        n = len(labels)
        self.steps = augmentation.steps_per_epoch(n, batch_size, train, num_shards)
        self.first_epoch, self.start = 0, 0
        self._plan: tuple[int, augmentation.EpochPlan, torch.Tensor | None] | None = None
        self._last: tuple[tuple[int, int], tuple] | None = None  # both external sources ask per batch

    def restart(self, first_epoch: int, start: int) -> None:
        """A new pipeline begins: its epoch 0 is `first_epoch`, from batch `start`."""
        self.first_epoch, self.start, self._last = first_epoch, start, None

    def _epoch_plan(self, epoch: int) -> tuple[augmentation.EpochPlan, torch.Tensor | None]:
        """The epoch's plan, and its order on the GPU when the images live there (copied
        once per epoch, so a batch's gather needs nothing from the host)."""
        if self._plan is None or self._plan[0] != epoch:
            n = len(self.labels)
            p = (augmentation.epoch_plan(n, self.seed, epoch, self.shard_id, self.num_shards) if self.train
                 else augmentation.in_order(n))
            on_gpu = p.order.to(self.images.device) if isinstance(self.images, torch.Tensor) else None
            self._plan = (epoch, p, on_gpu)
        return self._plan[1], self._plan[2]

    def __call__(self, info: types.BatchInfo) -> tuple:
        key = (info.epoch_idx, info.iteration)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._batch(info))
        return self._last[1]

    def _batch(self, info: types.BatchInfo) -> tuple:
        k = info.iteration + (self.start if info.epoch_idx == 0 else 0)
        if k >= self.steps:
            raise StopIteration
        p, order_on_gpu = self._epoch_plan(self.first_epoch + info.epoch_idx)
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        idx = p.order[sl].numpy()
        if order_on_gpu is not None:  # raw arrays on the GPU: gathered there, nothing crosses PCIe
            images = self.images[order_on_gpu[sl]]
        elif isinstance(self.images, list):
            images = [self.images[i] for i in idx]
        else:
            images = self.images[idx]
        return (images, self.labels[idx], p.offsets[sl].numpy().astype(np.int32),
                p.flips[sl].numpy().astype(np.int32))


def _pipeline(source: _BatchSource, *, encoded: bool, gpu: bool, mean: np.ndarray, inv_std: np.ndarray,
              train: bool, channels_last: bool, dtype: types.DALIDataType):
    """The graph: decode, normalise, zero-pad-4 crop at the given offset, mirror, lay out."""
    raw_on_gpu = gpu and not encoded
    images = fn.external_source(source=lambda info: source(info)[0], batch=True, batch_info=True,
                                device="gpu" if raw_on_gpu else "cpu", layout=None if encoded else "HWC",
                                dtype=types.UINT8, name="images")
    if train:
        labels, offsets, flips = fn.external_source(source=lambda info: source(info)[1:], num_outputs=3,
                                                    batch=True, batch_info=True)
    else:
        labels = fn.external_source(source=lambda info: source(info)[1], batch=True, batch_info=True)
    if encoded:
        images = fn.decoders.image(images, device="mixed" if gpu else "cpu", output_type=types.RGB)
    # Normalise first, so the padding below is zero in normalised space, as in the paper.
    # The constants live where the op runs: a host constant in a GPU expression would be
    # copied to the GPU for every batch.
    where = "gpu" if gpu else "cpu"
    mean_t, inv_std_t = types.Constant(mean, device=where), types.Constant(inv_std, device=where)
    x = (fn.cast(images, dtype=types.FLOAT) * (1.0 / 255.0) - mean_t) * inv_std_t
    if train:
        x = fn.slice(x, start=offsets, shape=[recipe.CROP, recipe.CROP], axis_names="HW",
                     out_of_bounds_policy="pad", fill_values=0.0)
    x = fn.crop_mirror_normalize(x, mirror=flips if train else False, dtype=dtype,
                                 output_layout="HWC" if channels_last else "CHW")
    return x, labels.gpu() if gpu else labels


class DaliLoader:
    """Epochs of (images, labels) torch batches from a DALI pipeline; see the module doc."""

    def __init__(self, split: Split | EncodedSplit, batch_size: int, mean: np.ndarray, std: np.ndarray, *,
                 device: torch.device, train: bool, seed: int = 0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, shard_id: int = 0, num_shards: int = 1) -> None:
        require_dali()
        self.gpu = device.type == "cuda"
        self.encoded = isinstance(split, EncodedSplit)
        if self.encoded:
            images = split.files
        elif self.gpu:  # raw arrays (the official archive) live on the GPU
            images = torch.from_numpy(split.images).to(device)
        else:
            images = split.images
        self.source = _BatchSource(images, split.labels, batch_size, train, seed, shard_id, num_shards)
        self.steps_per_epoch = self.source.steps
        self.train, self.channels_last, self.batch_size = train, channels_last, batch_size
        self.device_id = (device.index or 0) if self.gpu else None
        # DALI has no bfloat16: under bf16 autocast it emits fp32 and the first conv casts.
        self.dali_dtype = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
        self.mean = mean.astype(np.float32)
        self.inv_std = (1.0 / std).astype(np.float32)
        self.seed = seed
        self._iterator: DALIGenericIterator | None = None
        self._next: tuple[int, int] | None = None

    def _build(self, first_epoch: int, start: int) -> None:
        self.source.restart(first_epoch, start)
        build = pipeline_def(_pipeline, batch_size=self.batch_size, num_threads=NUM_THREADS,
                             device_id=self.device_id, seed=self.seed)
        pipe = build(self.source, encoded=self.encoded, gpu=self.gpu, mean=self.mean, inv_std=self.inv_std,
                     train=self.train, channels_last=self.channels_last, dtype=self.dali_dtype)
        # No reader and no size: the external source ends each epoch with StopIteration, and
        # it already drops (training) or keeps (evaluation) the last partial batch.
        self._iterator = DALIGenericIterator(pipe, OUTPUTS)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch from batch `start` on. Consecutive epochs reuse the
        pipeline; a jump (resume, or an epoch left unfinished) rebuilds it."""
        if not self.train:
            epoch = start = 0
        if self._iterator is None or (epoch, start) != self._next:
            self._build(epoch, start)
        self._next = None  # an epoch left unfinished cannot be continued: rebuild next time
        iterator, last = self._iterator, self.steps_per_epoch - 1
        for k in range(start, self.steps_per_epoch):
            out = next(iterator)[0]
            x, y = out["images"], out["labels"]
            if k == last:
                # The trainer takes exactly steps_per_epoch batches and never resumes this
                # generator after the last one, so the epoch is closed before handing it out.
                self._close_epoch(epoch)
            yield (x.permute(0, 3, 1, 2) if self.channels_last else x), y.view(-1)

    def _close_epoch(self, epoch: int) -> None:
        """Reach the end the external source signals, and rearm the pipeline for the next epoch."""
        try:  # next(), not a for loop: DALI's __iter__ resets an iterator that was consumed
            next(self._iterator)
        except StopIteration:
            self._iterator.reset()
        else:
            raise RuntimeError("DALI pipeline yielded more batches than the epoch plan holds")
        self._next = (epoch + 1, 0) if self.train else (0, 0)
