"""Evaluation preprocessing of published weights, exactly as their sources run it.

torchvision's ``Resize(short side)`` -> ``CenterCrop`` -> ``ToTensor`` -> ``Normalize`` on Pillow images, which the
official ODConv ``main.py`` (Li, Zhou, Yao, ICLR 2022, arXiv:2209.07947: ``Resize(256)``, ``CenterCrop(224)``,
bilinear) and timm's ``transforms_imagenet_eval`` (``floor(size / crop_pct)``, bicubic for the CondConv EfficientNets of
Yang et al., arXiv:1904.04971) both build; written here with Pillow and torch alone (no torchvision), step for step:
the shorter side resized to ``floor(image_size / crop_pct)`` (the longer one ``int(short * long / short_in)``), the
crop's offset ``int(round((size - crop) / 2))``, ``uint8 / 255`` in float32, then ``(x - mean) / std``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INTERPOLATIONS", "eval_transform", "resize_shorter"]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def _pil_mode(interpolation: str):
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS}[interpolation]


def resize_shorter(img, size: int, interpolation: str = "bilinear"):
    """A Pillow image with its shorter side ``size`` (the longer one scaled and truncated, as torchvision does)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _pil_mode(interpolation))


def eval_transform(img, *, image_size: int, crop_pct: float, interpolation: str, mean, std) -> torch.Tensor:
    """A Pillow image -> the normalised ``(3, image_size, image_size)`` float32 tensor of the source's evaluation.

    Args:
        img: a Pillow image (converted to RGB here).
        image_size: the crop's side. crop_pct: the crop's share of the resized shorter side
            (resize to ``floor(image_size / crop_pct)``). interpolation: ``'bilinear'``, ``'bicubic'``, ...
        mean, std: per-channel normalisation of the [0, 1] values.
    """
    import math

    from PIL import Image

    img = resize_shorter(img.convert("RGB"), math.floor(image_size / crop_pct), interpolation)
    w, h = img.size
    if w < image_size or h < image_size:  # torchvision pads with zeros before cropping
        canvas = Image.new("RGB", (max(w, image_size), max(h, image_size)))
        canvas.paste(img, ((max(w, image_size) - w) // 2, (max(h, image_size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)
