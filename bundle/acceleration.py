"""Single-device throughput options the training config selects: data caching and the memory layout of batches.

Mixed precision needs no code here: MONAI's trainer and evaluator take ``amp`` and ``amp_kwargs``
(the autocast dtype), and the trainer brings its own GradScaler (see ``configs/train.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.engines.utils import PrepareBatch, default_prepare_batch

CACHE_MODES = ("memory", "disk", "none")


def cached_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """A MONAI dataset over ``data`` that keeps the deterministic part of ``transform`` (everything
    before the first random transform) between epochs:

    - ``"memory"``: ``CacheDataset`` (all items, computed up front with ``num_workers`` threads);
    - ``"disk"``: ``PersistentDataset`` under ``cache_dir``, computed on first use and reused by later
      runs and by every process of a multi-GPU run; the file names hash the item *and* the
      deterministic transforms, so changing ``image_size`` or the windowing never reads stale files;
    - ``"none"``: plain ``Dataset``, everything recomputed each time.

    A factory rather than a ``_target_`` switch in the config because the three classes take different
    arguments, while ``data`` and ``transform`` must stay config ids (MONAI's bundle properties and
    ``configs/evaluate.json`` override them).
    """
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=num_workers, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError('cache "disk" needs a cache_dir')
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"unknown cache {cache!r}; choose one of {', '.join(CACHE_MODES)}")


class PrepareBatchInMemoryFormat(PrepareBatch):
    """MONAI's ``default_prepare_batch`` (image and label to ``device``), then the image (B, C, H, W[, D])
    into ``memory_format``: channels_last (channels_last_3d for volumes) on CUDA, where cuDNN's
    mixed-precision convolutions run fastest in that layout; None keeps it as it is. The label is
    left alone: MONAI's ``to_kwargs`` would apply the format to it as well, and a (B,) tensor has none.
    """

    def __init__(self, memory_format: torch.memory_format | None = None):
        self.memory_format = memory_format

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.memory_format is not None:
            image = image.contiguous(memory_format=self.memory_format)
        return image, label
