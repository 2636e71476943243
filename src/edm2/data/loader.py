"""The road from a dataset to the training step: a deterministic endless stream of item indices, and the
micro-batches of it that one process computes.

The stream is a pure function of (seed, position), so a run resumes exactly from the number of images it has
seen and splits over any number of processes without state: global batch k covers stream positions
k*batch .. (k+1)*batch-1, and accumulation round r of process p takes the `batch_gpu` positions starting at
(r * world + p) * batch_gpu within it.
"""

from __future__ import annotations

import numpy as np
import torch

from edm2.data.datasets import ImageDataset

__all__ = ["InfiniteSampler", "BatchStream"]


class InfiniteSampler:
    """Deterministic endless shuffled index stream: the indices of global batch k depend only on
    (seed, k), so training resumes exactly and splits over ranks without state."""

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_items)}
        return self._perm_cache[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Items number start .. start+count-1 of the stream."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.num_items):
            sel = pos // self.num_items == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.num_items]
        return out


class BatchStream:
    """This process's micro-batches of the global batch starting at a given image count."""

    def __init__(self, dataset: ImageDataset, seed: int, batch: int, batch_gpu: int, label_dim: int,
                 rank: int = 0, world: int = 1) -> None:
        if batch % (batch_gpu * world) != 0:
            raise ValueError(f"batch {batch} is not a multiple of {world} processes x batch_gpu {batch_gpu}")
        self.dataset = dataset
        self.sampler = InfiniteSampler(len(dataset), seed)
        self.batch_gpu = batch_gpu
        self.label_dim = label_dim
        self.offsets = [(r * world + rank) * batch_gpu for r in range(batch // (batch_gpu * world))]

    def micro_batches(self, nimg: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(images in [-1, 1], one-hot labels or None) per accumulation round of the batch starting at `nimg`."""
        return [self.dataset.batch(self.sampler.indices(nimg + offset, self.batch_gpu), self.label_dim)
                for offset in self.offsets]
