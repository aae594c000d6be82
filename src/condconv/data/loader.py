"""Batches of a dataset, reproducible from ``(seed, epoch)`` and resumable mid-epoch."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from condconv.data.base import ArrayImageDataset, ImageDataset

__all__ = ["EpochLoader", "default_workers"]


def default_workers() -> int:
    """DataLoader worker processes by default: ``min(4, CPU count)``."""
    return min(4, os.cpu_count() or 1)


def _unwrapped(batches: Iterator) -> Iterator:
    """Batches of a DataLoader, with an exception raised in a worker process re-raised as its original one-line
    message (the DataLoader wraps it in its worker's traceback)."""
    try:
        yield from batches
    except Exception as exc:  # noqa: BLE001 - re-raised as the same type
        text = str(exc)
        if "DataLoader worker process" not in text or "Original Traceback" not in text:
            raise
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        try:
            error = type(exc)(message if name == type(exc).__name__ else last)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments
            raise exc from None
        raise error from None


class EpochLoader:
    """Batches of an :class:`ImageDataset`, reproducible from ``(seed, epoch)`` and resumable mid-epoch.

    Training order comes from :class:`~torch.utils.data.DistributedSampler` (``seed + epoch``; one process is
    ``num_replicas=1``), so ``set_epoch`` reshuffles and each of ``world_size`` processes draws its own shard.
    Evaluation (``shuffle=False``) shards ``rank::world_size`` without padding, so every image counts once.
    In-memory datasets are batched and augmented in the calling process; ImageFolder data goes through a
    :class:`~torch.utils.data.DataLoader` with ``num_workers`` (given its own generator, so the global RNG is
    never consumed).

    Args:
        dataset: the dataset.
        batch_size: images per batch (per process).
        shuffle: shuffle (training).
        seed: shuffling seed.
        drop_last: drop the last incomplete batch.
        rank: this process's rank.
        world_size: number of processes.
        num_workers: DataLoader workers (ImageFolder data only; None: :func:`default_workers`).
        pin_memory: pin batches (CUDA).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int | None = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.epoch = 0
        self.sampler = (
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            if shuffle
            else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def indices(self) -> list[int]:
        """This process's sample indices for the current epoch, in order."""
        if self.sampler is not None:
            return list(self.sampler)
        return list(range(self.rank, len(self.dataset), self.world_size))

    def batches(self) -> list[list[int]]:
        idx = self.indices()
        out = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if out and self.drop_last and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(range(self.rank, len(self.dataset), self.world_size))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the current epoch, starting after ``start_step`` already-consumed batches."""
        batches = self.batches()[start_step:]
        if not batches:
            return iter(())
        if isinstance(self.dataset, ArrayImageDataset):
            return (self.dataset.get_batch(b, self.epoch) for b in batches)
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            persistent_workers=False,
        )
        return _unwrapped(iter(loader)) if self.num_workers > 0 else iter(loader)
