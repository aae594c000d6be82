"""``root/<class>/**/<image>`` trees (the ImageNet layout), decoded with Pillow."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from condconv.data.base import ImageDataset, sample_keys
from condconv.data.preprocess import eval_transform
from condconv.models.pretrained import EvalConfig
from condconv.utils.checks import OptionError

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderDataset(ImageDataset):
    """``root/<class>/**/<image>`` tree (ImageNet layout), decoded with Pillow.

    Training: random-resized-crop (scale 0.08-1, ratio 3/4-4/3) to ``image_size`` and horizontal flip; evaluation:
    resize the shorter side to ``image_size / crop_pct`` and center-crop. Resizing is bilinear with antialiasing.

    Args:
        root: folder holding one sub-folder per class.
        name: dataset name recorded in the dataset.
        split: split name.
        image_size: output side in pixels.
        augment: training augmentation.
        seed: augmentation seed.
        crop_pct: center-crop fraction at evaluation.
        preprocess: a published model's evaluation preprocessing
            (:func:`condconv.models.pretrained.eval_config`): evaluation then resizes with Pillow as its source
            does (:func:`condconv.data.preprocess.eval_transform`) and normalises with its mean/std, its image size and
            crop fraction replacing ``image_size`` and ``crop_pct``.
        classes: class names to use (default: the sorted sub-folder names of ``root``).

    Raises:
        FileNotFoundError: ``root`` missing.
        ValueError: no class folders, or a class folder without images (names the folder).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        name: str = "imagefolder",
        split: str = "train",
        image_size: int = 224,
        augment: bool = False,
        seed: int = 0,
        crop_pct: float = 0.875,
        classes: Sequence[str] | None = None,
        preprocess: EvalConfig | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if classes is None:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"no class sub-folders in image folder {root}")
        samples: list[tuple[str, int]] = []
        for ci, cname in enumerate(classes):
            cdir = root / cname
            found = []
            if cdir.is_dir():
                for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                    dirnames.sort()
                    found += [
                        os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
                    ]
            if not found:
                raise ValueError(f"class folder {cdir} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
            samples += [(f, ci) for f in found]
        if image_size < 8:
            raise OptionError("image_size", f"image_size must be >= 8, got {image_size}")
        self.root, self.samples, self.classes = root, samples, list(classes)
        self.name, self.split = name, split
        self.in_chans, self.image_size = 3, int(image_size)
        self.augment, self.seed, self.crop_pct = bool(augment), int(seed), float(crop_pct)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.preprocess = preprocess
        if preprocess is not None:  # a source's evaluation preprocessing (Pillow resizing, its mean/std)
            self.image_size, self.crop_pct = int(preprocess.image_size), float(preprocess.crop_pct)
            self.mean, self.std = tuple(preprocess.mean), tuple(preprocess.std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std).view(-1, 1, 1)
        self._targets = np.array([c for _, c in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return self._targets

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        """A copy restricted to ``indices`` (keeps class list and settings)."""
        new = object.__new__(ImageFolderDataset)
        new.__dict__.update(self.__dict__)
        new.samples = [self.samples[i] for i in indices]
        new._targets = self._targets[np.asarray(indices, dtype=np.int64)]
        return new

    def without(self, paths: set[str]) -> ImageFolderDataset:
        """A copy without the samples whose file is in ``paths``."""
        return self.subset([i for i, (path, _) in enumerate(self.samples) if path not in paths])

    def check_files(self, progress: bool = False) -> list[tuple[str, str]]:
        """Open every image file once (its header only: fast) and return ``(path, reason)`` for those that fail."""
        from PIL import Image, UnidentifiedImageError
        from tqdm import tqdm

        bad = []
        for path, _ in tqdm(self.samples, desc=f"checking {self.split} images", disable=not progress, leave=False,
                            dynamic_ncols=True, mininterval=0.5):
            try:
                with Image.open(path) as img:
                    if img.size[0] < 1 or img.size[1] < 1:
                        raise ValueError(f"empty image {img.size}")
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                bad.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        return bad

    @staticmethod
    def decode(path: str) -> torch.Tensor:
        """Decode an image file into a uint8 tensor (3, H, W); errors name the file."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                arr = np.array(img.convert("RGB"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"image file not found: {path}") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode image file {path}: {exc}") from exc
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"cannot decode image file {path}: unexpected array shape {arr.shape}")
        return torch.from_numpy(arr).permute(2, 0, 1)

    def _resize(self, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = img.unsqueeze(0).to(torch.float32)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x[0]

    def _source_eval(self, path: str) -> torch.Tensor:
        from PIL import Image

        cfg = self.preprocess
        with Image.open(path) as img:
            return eval_transform(img, image_size=cfg.image_size, crop_pct=cfg.crop_pct,
                                  interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        if self.preprocess is not None and not self.augment:
            try:
                return self._source_eval(path), target
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"image file not found: {path}") from exc
            except OSError as exc:
                raise ValueError(f"cannot decode image file {path}: {exc}") from exc
        img = self.decode(path)
        _, h, w = img.shape
        s = self.image_size
        if self.augment:
            key = int(sample_keys(self.seed, self.epoch, [index])[0] & np.uint64(0x7FFFFFFFFFFFFFFF))
            g = torch.Generator().manual_seed(key)
            top, left, ch, cw = _random_resized_crop_box(h, w, g)
            x = self._resize(img[:, top : top + ch, left : left + cw], (s, s))
            if torch.rand((), generator=g).item() < 0.5:
                x = x.flip(-1)
            if self.policy is not None:  # on the uint8 crop, as the TPU trainer applies it
                crop = x.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0)[None]
                x = self.apply_policy(crop, [index], self.epoch)[0].permute(2, 0, 1).to(torch.float32)
        else:
            short = int(math.floor(s / self.crop_pct))
            if h <= w:
                nh, nw = short, max(1, int(round(w * short / h)))
            else:
                nh, nw = max(1, int(round(h * short / w))), short
            x = self._resize(img, (nh, nw))
            top, left = max(0, int(round((nh - s) / 2))), max(0, int(round((nw - s) / 2)))
            x = x[:, top : top + s, left : left + s]
            if x.shape[-2:] != (s, s):  # images smaller than the crop
                x = self._resize(x, (s, s))
        x = x.clamp_(0, 255).div_(255.0).sub_(self._mean).mul_(self._inv_std)
        return x.contiguous(), target


def _random_resized_crop_box(
    h: int,
    w: int,
    g: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (0.75, 4 / 3),
) -> tuple[int, int, int, int]:
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(h - ch, int(u[2] * (h - ch + 1)))
            left = min(w - cw, int(u[3] * (w - cw + 1)))
            return top, left, ch, cw
    # fallback: central crop with the ratio clamped into range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, max(1, ch), max(1, cw)
