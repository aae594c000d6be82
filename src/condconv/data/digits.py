"""The embedded default data: scikit-learn's copy of the UCI handwritten digits (1,797 grayscale 8x8 images,
10 classes), split once with a fixed seed (stratified; 600 test images) and upsampled (bilinear) to 32x32."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from condconv.data.base import SPLIT_SEED

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DIGITS_TEST_SIZE", "digits_split", "load_digits_arrays"]

DIGITS_MEAN, DIGITS_STD = (0.305,), (0.324,)  # of the 32x32 upsampled images (all 1,797)
DIGITS_TEST_SIZE = 600


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 scikit-learn digits upsampled (bilinear) to 32x32.

    Returns:
        uint8 tensor (1797, 32, 32, 1) and int64 labels (1797,).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x, np.asarray(d.target, dtype=np.int64)


def digits_split(split: str) -> np.ndarray:
    """Sorted indices of the ``'train'`` (1,197) or ``'test'`` (600) digits."""
    from sklearn.model_selection import train_test_split

    _, y = load_digits_arrays()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )
    return np.sort(train_idx if split == "train" else test_idx)
