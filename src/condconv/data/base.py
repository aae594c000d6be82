"""Datasets' common ground: the :class:`ImageDataset` interface, in-memory image arrays with batched augmentation,
per-sample random keys, stratified subsets.

Every random choice of the augmentation is a pure function of ``(seed, epoch, sample index)`` (:func:`sample_keys`),
so an epoch is reproducible batch for batch whichever process draws a sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from condconv.utils.checks import OptionError

__all__ = ["SPLIT_SEED", "ArrayImageDataset", "ImageDataset", "sample_keys", "subset_indices"]

logger = logging.getLogger(__name__)

SPLIT_SEED = 0  # fixed: the digits train/test split and every train_size subset are the same for all runs


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, stream: int = 0) -> np.ndarray:
    """64-bit random keys, a pure function of ``(seed, epoch, index, stream)``.

    Args:
        seed: run seed.
        epoch: epoch number.
        indices: dataset indices, shape (B,).
        stream: independent stream id (e.g. 0 for crops, 1 for flips).

    Returns:
        ``np.uint64`` array of shape (B,).
    """
    base = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    base = _splitmix64(base ^ np.uint64(stream))
    return _splitmix64(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


class ImageDataset(Dataset):
    """Common attributes of the datasets here.

    Attributes:
        name: dataset name ('digits', 'cifar10', 'cifar100', 'imagefolder').
        split: 'train' or 'test'.
        classes: class names; ``num_classes == len(classes)``.
        in_chans: image channels of the returned tensors.
        image_size: side of the returned (square) images.
        mean, std: per-channel normalisation.
        augment: whether training augmentation is applied.
        policy: an AutoAugment/RandAugment policy (:mod:`condconv.data.augment`) applied after the crop and flip of
            training images, or None; its randomness is a function of ``(seed, epoch, index)`` like the rest.
        seed: seed of the augmentation.
        epoch: epoch used by ``__getitem__`` (set by :meth:`set_epoch`).
    """

    name: str = ""
    split: str = "train"
    classes: list[str]
    in_chans: int = 3
    image_size: int = 32
    augment: bool = False
    policy = None
    seed: int = 0
    epoch: int = 0

    def apply_policy(self, images: torch.Tensor, indices: Sequence[int] | np.ndarray, epoch: int) -> torch.Tensor:
        """``images`` (uint8, ``(B, H, W, C)``) through :attr:`policy`, each image with the generator of its
        ``(seed, epoch, index)`` (stream 2: independent of the crop and flip); unchanged without a policy."""
        if self.policy is None or not self.augment or len(images) == 0:
            return images
        from condconv.data.augment import augment_batch

        return augment_batch(images, self.policy, sample_keys(self.seed, epoch, indices, stream=2))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return (
            f"{self.name}/{self.split}: {len(self)} images {self.in_chans}x{self.image_size}x{self.image_size}, "
            f"{self.num_classes} classes, augment={self.augment}"
        )


class ArrayImageDataset(ImageDataset):
    """Small in-memory dataset (digits, CIFAR) with batched augmentation.

    Training augmentation: random crop with zero padding ``pad`` and (if ``hflip``) horizontal flip, both per
    sample and drawn from :func:`sample_keys`; then scaling to [0, 1] and per-channel normalisation.

    Args:
        images: uint8 tensor (N, H, W, C).
        labels: int64 tensor (N,).
        name: dataset name.
        split: split name.
        classes: class names.
        mean: per-channel mean.
        std: per-channel std.
        augment: apply training augmentation.
        pad: crop padding in pixels.
        hflip: random horizontal flips.
        seed: augmentation seed.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        split: str,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        pad: int = 4,
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.targets = labels.to(torch.int64)
        self.name, self.split, self.classes = name, split, list(classes)
        self.in_chans = int(images.shape[3])
        self.image_size = int(images.shape[1])
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment, self.pad, self.hflip, self.seed = bool(augment), int(pad), bool(hflip), int(seed)
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def labels(self) -> np.ndarray:
        return self.targets.numpy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.get_batch([index], self.epoch)
        return x[0], int(y[0])

    def get_batch(
        self, indices: Sequence[int] | np.ndarray, epoch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, normalised batch.

        Args:
            indices: dataset indices (B,).
            epoch: epoch for the augmentation randomness (default: ``self.epoch``).

        Returns:
            images float32 (B, C, H, W) and labels int64 (B,).
        """
        idx_np = np.asarray(indices, dtype=np.int64)
        idx = torch.from_numpy(idx_np)
        imgs = self.images[idx]  # (B, H, W, C) uint8
        if self.augment and len(idx_np) and (self.pad > 0 or self.hflip):
            epoch = self.epoch if epoch is None else int(epoch)
            b, h, w, _ = imgs.shape
            p = self.pad
            rows = torch.arange(h).view(1, h)
            cols = torch.arange(w).view(1, w)
            if p > 0:
                imgs = F.pad(imgs, (0, 0, p, p, p, p))  # zero padding of H and W
                k = sample_keys(self.seed, epoch, idx_np, stream=0)
                dy = torch.from_numpy((k % np.uint64(2 * p + 1)).astype(np.int64))
                dx = torch.from_numpy(((k >> np.uint64(32)) % np.uint64(2 * p + 1)).astype(np.int64))
                rows = rows + dy.view(b, 1)
                cols = cols + dx.view(b, 1)
            else:
                rows, cols = rows.expand(b, h), cols.expand(b, w)
            if self.hflip:
                flip = torch.from_numpy((sample_keys(self.seed, epoch, idx_np, stream=1) & np.uint64(1)).astype(bool))
                cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
            bidx = torch.arange(b).view(b, 1, 1)
            imgs = imgs[bidx, rows.view(b, h, 1), cols.view(b, 1, w)]
        imgs = self.apply_policy(imgs, idx_np, self.epoch if epoch is None else int(epoch))
        x = imgs.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = x.sub_(self._mean).mul_(self._inv_std).contiguous()
        return x, self.targets[idx]


def subset_indices(labels: np.ndarray, train_size: int | float | None) -> np.ndarray | None:
    """Stratified subset of ``labels`` of size ``train_size`` (int) or fraction (float); None = all."""
    n = len(labels)
    if train_size is None:
        return None
    if isinstance(train_size, bool) or not isinstance(train_size, (int, float, np.integer, np.floating)):
        raise TypeError(f"train_size must be an int (images) or a float fraction in (0, 1], got {train_size!r}")
    if isinstance(train_size, (float, np.floating)) and 0.0 < train_size <= 1.0:
        count = max(1, int(round(float(train_size) * n)))
    elif float(train_size).is_integer() and train_size > 0:
        count = int(train_size)
    else:
        raise OptionError("train_size", f"train_size must be a positive int (images) or a fraction in (0, 1], got "
                          f"{train_size}")
    if count >= n:
        if count > n:
            logger.warning("train_size=%s exceeds the %d training images; using all", train_size, n)
        return None
    # proportional allocation per class (largest remainder), then a seeded choice within each class
    rng = np.random.default_rng(SPLIT_SEED)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (count / n)
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: count - int(alloc.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == c))[: alloc[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picked))
