"""The road from a dataset to the training step: a deterministic endless stream of item indices, the training view
of a dataset (the official `max_size` and `xflip` options), and the micro-batches of the stream that one process
computes, read by a `torch.utils.data.DataLoader` with worker processes.

The stream is a pure function of (seed, position), so a run resumes exactly from the number of images it has
seen and splits over any number of processes without state: global batch k covers stream positions
k*batch .. (k+1)*batch-1, and accumulation round r of process p takes the `batch_gpu` positions starting at
(r * world + p) * batch_gpu within it. Workers only read what the stream names, in its order, so the batches
are the same with or without them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["InfiniteSampler", "TrainingSet", "BatchStream", "MicroBatch", "LoadError", "read_in_order"]

MicroBatch = tuple[torch.Tensor, "torch.Tensor | None"]  # raw items [N, C, H, W], one-hot labels [N, label_dim]


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


class LoadError:
    """A ValueError raised while reading, carried out of a worker process as a value (a raised one would come
    back as a multi-line message with the worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class TrainingSet(torch.utils.data.Dataset):
    """The items training draws from, as the official dataset options define them: `max_size` keeps a random
    subset (drawn with `random_seed`, in index order), then `xflip` doubles the set with mirrored copies (items
    N..2N-1 are items 0..N-1 flipped left to right). Batches are (raw items, one-hot labels or None)."""

    def __init__(self, dataset, label_dim: int, xflip: bool = False, max_size: int | None = None,
                 random_seed: int = 0) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(f"--max-size must be positive, got {max_size}")
        self.dataset = dataset
        self.label_dim = label_dim
        raw_idx = np.arange(len(dataset), dtype=np.int64)
        if max_size is not None and max_size < raw_idx.size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(raw_idx)
            raw_idx = np.sort(raw_idx[:max_size])
        self.flip = np.zeros(raw_idx.size, dtype=bool)
        if xflip:
            raw_idx = np.tile(raw_idx, 2)
            self.flip = np.concatenate([self.flip, np.ones_like(self.flip)])
        self.raw_idx = raw_idx

    def __len__(self) -> int:
        return self.raw_idx.size

    def batch(self, indices) -> MicroBatch:
        """Items `indices` of the view, as one batch."""
        indices = np.asarray(indices, dtype=np.int64)
        raw = self.raw_idx[indices]
        items = self.dataset.read_raw(raw)
        flip = self.flip[indices]
        if flip.any():
            items = items.copy()
            items[flip] = items[flip][..., ::-1]
        labels = None
        if self.label_dim:
            labels = torch.nn.functional.one_hot(torch.from_numpy(self.dataset.labels[raw]), self.label_dim)
            labels = labels.to(torch.float32)
        return torch.from_numpy(np.ascontiguousarray(items)), labels

    def __getitems__(self, indices: list[int]) -> MicroBatch | LoadError:
        try:
            return self.batch(indices)
        except ValueError as e:
            return LoadError(str(e))

    def __getitem__(self, index: int) -> MicroBatch | LoadError:
        return self.__getitems__([index])


def _as_is(batch):
    return batch


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """Ctrl-C and schedulers signal the whole process group; the trainer turns SIGINT/SIGTERM into a clean stop
    (checkpoint, then exit) and shuts its workers down itself, so the workers must not die of them first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _MicroBatchIndices:
    """The DataLoader's batch sampler: this process's micro-batches of every global batch from `start` on."""

    def __init__(self, stream: BatchStream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[int]]:
        nimg = self.start
        while True:
            for offset in self.stream.offsets:
                yield self.stream.sampler.indices(nimg + offset, self.stream.batch_gpu).tolist()
            nimg += self.stream.batch


class BatchStream:
    """This process's micro-batches of the global batch starting at a given image count: read directly
    (`micro_batches`) or ahead by `workers` DataLoader processes (`steps`)."""

    def __init__(self, dataset, seed: int, batch: int, batch_gpu: int, label_dim: int, rank: int = 0,
                 world: int = 1, xflip: bool = False, max_size: int | None = None, workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2) -> None:
        if batch % (batch_gpu * world) != 0:
            raise ValueError(f"batch {batch} is not a multiple of {world} processes x batch_gpu {batch_gpu}")
        if workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {workers}")
        self.dataset = dataset
        self.data = TrainingSet(dataset, label_dim, xflip=xflip, max_size=max_size)
        self.sampler = InfiniteSampler(len(self.data), seed)
        self.batch, self.batch_gpu, self.label_dim = batch, batch_gpu, label_dim
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, prefetch
        self.offsets = [(r * world + rank) * batch_gpu for r in range(batch // (batch_gpu * world))]

    def micro_batches(self, nimg: int) -> list[MicroBatch]:
        """(raw items, one-hot labels or None) per accumulation round of the batch starting at `nimg`."""
        return [self.data.batch(self.sampler.indices(nimg + offset, self.batch_gpu)) for offset in self.offsets]

    @contextlib.contextmanager
    def steps(self, start: int) -> Iterator[Iterator[list[MicroBatch]]]:
        """An endless iterator of `micro_batches(start)`, `micro_batches(start + batch)`, ..., read ahead by the
        worker processes (none: read when asked). The workers stop when the block ends."""
        if self.workers == 0:
            yield (self.micro_batches(nimg) for nimg in range(start, 1 << 62, self.batch))
            return
        loader = torch.utils.data.DataLoader(self.data, batch_sampler=_MicroBatchIndices(self, start),
                                             num_workers=self.workers, collate_fn=_as_is, pin_memory=self.pin_memory,
                                             prefetch_factor=self.prefetch,
                                             worker_init_fn=_leave_signals_to_the_trainer)
        it = iter(loader)
        try:
            yield self._group(it)
        finally:
            it._shutdown_workers()  # now, not when the iterator is garbage-collected

    def _group(self, it) -> Iterator[list[MicroBatch]]:
        while True:
            step = []
            for _ in self.offsets:
                item = next(it)
                if isinstance(item, LoadError):
                    raise ValueError(item.message)
                step.append(item)
            yield step


def read_in_order(dataset, batch_size: int, workers: int = 0,
                  indices: list[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, raw items) of `dataset` in batches of `batch_size`, in index order (all items, or `indices`),
    read ahead by `workers` DataLoader processes (for the dataset tool: statistics, encoding, decoding)."""
    order = list(range(len(dataset))) if indices is None else list(indices)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(TrainingSet(dataset, label_dim=0), batch_sampler=chunks,
                                         num_workers=workers, collate_fn=_as_is)
    for chunk, item in zip(chunks, loader):
        if isinstance(item, LoadError):
            raise ValueError(item.message)
        yield chunk, item[0]
