"""Datasets for training and evaluating CondConv models: embedded digits, CIFAR-10/100 folders, ImageFolder trees.

CondConv: Conditionally Parameterized Convolutions for Efficient Inference (Yang et al., NeurIPS 2019,
arXiv:1904.04971) trains on ImageNet; this module gives the same pipeline for three sources:

* ``'digits'`` (default, offline): scikit-learn's bundled UCI handwritten digits (1,797 grayscale 8x8 images,
  10 classes), split once with a fixed seed (stratified, 600 test images), upsampled to 32x32.
* ``'cifar10'`` / ``'cifar100'``: the official folders in python (pickle) or binary format under ``data_dir``.
  Pickles are read with a *restricted* unpickler that only rebuilds numpy arrays/dtypes and plain containers.
* ``'imagefolder'``: ``root/<split>/<class>/<image>`` trees (the ImageNet layout), decoded with Pillow.

Augmentation and normalisation are plain torch. Every random choice of the augmentation (crop offsets, flips,
random-resized-crop boxes) is a pure function of ``(seed, epoch, sample index)``; together with data order drawn
from ``seed + epoch`` (``DistributedSampler``) this makes an epoch reproducible batch for batch, so a resumed run
can skip exactly the consumed batches, and a sample is augmented identically whichever process of a distributed
run draws it.

Example:
    >>> ds = build_dataset("digits", "train", train_size=200)
    >>> loader = EpochLoader(ds, batch_size=50, shuffle=True, drop_last=True)
    >>> loader.set_epoch(0)
    >>> x, y = next(iter(loader))
    >>> tuple(x.shape), tuple(y.shape)
    ((50, 1, 32, 32), (50,))
"""

from __future__ import annotations

import codecs
import functools
import logging
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "EpochLoader",
    "ImageDataset",
    "ImageFolderDataset",
    "build_dataset",
    "load_cifar",
    "load_digits_arrays",
    "restricted_pickle_load",
    "sample_keys",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

DIGITS_MEAN, DIGITS_STD = (0.305,), (0.324,)  # of the 32x32 upsampled images (all 1,797)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_TEST_SIZE = 600
_SPLIT_SEED = 0  # fixed: the digits train/test split and every train_size subset are the same for all runs


# ----------------------------------------------------------------------------------------------------------------
# deterministic per-sample randomness
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------------
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
        seed: seed of the augmentation.
        epoch: epoch used by ``__getitem__`` (set by :meth:`set_epoch`).
    """

    name: str = ""
    split: str = "train"
    classes: list[str]
    in_chans: int = 3
    image_size: int = 32
    augment: bool = False
    seed: int = 0
    epoch: int = 0

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
        x = imgs.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = x.sub_(self._mean).mul_(self._inv_std).contiguous()
        return x, self.targets[idx]


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
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.root, self.samples, self.classes = root, samples, list(classes)
        self.name, self.split = name, split
        self.in_chans, self.image_size = 3, int(image_size)
        self.augment, self.seed, self.crop_pct = bool(augment), int(seed), float(crop_pct)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
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


# ----------------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------------
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


def _digits_split(split: str) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    _, y = load_digits_arrays()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=_SPLIT_SEED
    )
    return np.sort(train_idx if split == "train" else test_idx)


def _subset_indices(labels: np.ndarray, train_size: int | float | None) -> np.ndarray | None:
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
        raise ValueError(f"train_size must be a positive int (images) or a fraction in (0, 1], got {train_size}")
    if count >= n:
        if count > n:
            logger.warning("train_size=%s exceeds the %d training images; using all", train_size, n)
        return None
    # proportional allocation per class (largest remainder), then a seeded choice within each class
    rng = np.random.default_rng(_SPLIT_SEED)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (count / n)
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: count - int(alloc.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == c))[: alloc[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(picked))


# ----------------------------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------------------------
def _safe_codecs_encode(obj, encoding: str = "utf-8", errors: str = "strict"):
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is forbidden")
    return codecs.encode(obj, "latin1", errors)


def _safe_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _safe_codecs_encode
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays/dtypes/scalars and plain containers (no other globals)."""

    _allowed = _safe_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is forbidden (only numpy arrays and plain containers are allowed)"
            ) from None


def restricted_pickle_load(path: str | os.PathLike):
    """Load a pickle that may hold only numpy arrays, dtypes, numbers, strings, bytes and plain containers.

    Args:
        path: pickle file (e.g. a CIFAR python batch).

    Returns:
        The unpickled object; dict keys given as bytes are decoded (latin-1) to str.

    Raises:
        FileNotFoundError: the file is missing (names it).
        ValueError: the file is unreadable, truncated, or references a forbidden global (names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {path}: {exc}") from exc
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise ValueError(f"cannot read pickle file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


_CIFAR_LAYOUT = {
    # name: (python folder, python train files, python test file, label key, meta file, meta key,
    #        binary folder, binary train files, binary test file, label bytes, label byte used, binary meta)
    "cifar10": dict(
        py_dir="cifar-10-batches-py",
        py_train=[f"data_batch_{i}" for i in range(1, 6)],
        py_test="test_batch",
        py_label="labels",
        py_meta=("batches.meta", "label_names"),
        bin_dir="cifar-10-batches-bin",
        bin_train=[f"data_batch_{i}.bin" for i in range(1, 6)],
        bin_test="test_batch.bin",
        bin_label_bytes=1,
        bin_meta="batches.meta.txt",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": dict(
        py_dir="cifar-100-python",
        py_train=["train"],
        py_test="test",
        py_label="fine_labels",
        py_meta=("meta", "fine_label_names"),
        bin_dir="cifar-100-binary",
        bin_train=["train.bin"],
        bin_test="test.bin",
        bin_label_bytes=2,
        bin_meta="fine_label_names.txt",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


def _find_cifar(name: str, data_dir: Path) -> tuple[str, Path]:
    lay = _CIFAR_LAYOUT[name]
    candidates = [
        ("python", data_dir / lay["py_dir"], lay["py_test"]),
        ("python", data_dir, lay["py_test"]),
        ("binary", data_dir / lay["bin_dir"], lay["bin_test"]),
        ("binary", data_dir, lay["bin_test"]),
    ]
    for fmt, folder, marker in candidates:
        first_train = (lay["py_train"] if fmt == "python" else lay["bin_train"])[0]
        if (folder / marker).is_file() or (folder / first_train).is_file():
            return fmt, folder
    expected = ", ".join(str(folder / marker) for _, folder, marker in candidates[::2])
    raise FileNotFoundError(
        f"no {name} data under {data_dir}: expected {expected} (extract the python or binary archive from "
        "https://www.cs.toronto.edu/~kriz/cifar.html there; nothing is downloaded)"
    )


def _read_cifar_python(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_pickle_load(path)
    if not isinstance(obj, dict) or "data" not in obj or label_key not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"malformed CIFAR batch {path}: expected a dict with 'data' and '{label_key}', got {keys}")
    data, labels = obj["data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"malformed CIFAR batch {path}: 'data' must be a uint8 array (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed CIFAR batch {path}: labels are not integers ({exc})") from exc
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"malformed CIFAR batch {path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"malformed CIFAR batch {path}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar_binary(path: Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch file not found: {path}")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"cannot read CIFAR batch {path}: {exc}") from exc
    rec = label_bytes + 3072
    if raw.size == 0 or raw.size % rec:
        raise ValueError(f"malformed CIFAR binary batch {path}: size {raw.size} bytes is not a multiple of {rec}")
    raw = raw.reshape(-1, rec)
    labels = raw[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: (coarse, fine) -> fine
    if labels.max() >= num_classes:
        raise ValueError(f"malformed CIFAR binary batch {path}: labels outside [0, {num_classes})")
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_classes(name: str, fmt: str, folder: Path) -> list[str]:
    lay = _CIFAR_LAYOUT[name]
    n = lay["num_classes"]
    if fmt == "python":
        meta_file, key = lay["py_meta"]
        path = folder / meta_file
        if path.is_file():
            meta = restricted_pickle_load(path)
            names = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(names, list) or len(names) != n:
                raise ValueError(f"malformed CIFAR meta file {path}: expected '{key}' with {n} names")
            return [x.decode("latin1") if isinstance(x, bytes) else str(x) for x in names]
    else:
        path = folder / lay["bin_meta"]
        if path.is_file():
            try:
                names = [line.strip() for line in path.read_text(encoding="latin1").splitlines() if line.strip()]
            except OSError as exc:
                raise ValueError(f"cannot read CIFAR meta file {path}: {exc}") from exc
            if len(names) != n:
                raise ValueError(f"malformed CIFAR meta file {path}: expected {n} class names, got {len(names)}")
            return names
    return [str(i) for i in range(n)]


def load_cifar(
    name: str, data_dir: str | os.PathLike, split: str = "train"
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Read CIFAR-10/100 from the official python or binary folders.

    Args:
        name: 'cifar10' or 'cifar100'.
        data_dir: folder holding ``cifar-10-batches-py`` / ``cifar-10-batches-bin`` / ``cifar-100-python`` /
            ``cifar-100-binary``, or that folder itself.
        split: 'train' or 'test'.

    Returns:
        uint8 images (N, 32, 32, 3), int64 labels (N,), class names.
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    lay = _CIFAR_LAYOUT[name]
    fmt, folder = _find_cifar(name, Path(data_dir))
    n = lay["num_classes"]
    xs, ys = [], []
    if fmt == "python":
        files = lay["py_train"] if split == "train" else [lay["py_test"]]
        for f in files:
            path = folder / f
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR batch file not found: {path}")
            x, y = _read_cifar_python(path, lay["py_label"], n)
            xs.append(x)
            ys.append(y)
    else:
        files = lay["bin_train"] if split == "train" else [lay["bin_test"]]
        for f in files:
            x, y = _read_cifar_binary(folder / f, lay["bin_label_bytes"], n)
            xs.append(x)
            ys.append(y)
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)))
    return images, np.concatenate(ys), _cifar_classes(name, fmt, folder)


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------
def _normalize_split(split: str) -> str:
    s = str(split).lower()
    if s in ("train", "training"):
        return "train"
    if s in ("test", "val", "valid", "validation", "eval"):
        return "test"
    raise ValueError(f"split must be 'train' or 'test' (alias 'val'), got {split!r}")


def _is_cifar_dir(path: Path) -> str | None:
    for name in _CIFAR_LAYOUT:
        try:
            _find_cifar(name, path)
            return name
        except FileNotFoundError:
            pass
    return None


def build_dataset(
    name: str = "digits",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    train_size: int | float | None = None,
    augment: bool | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Build a dataset by name (or path).

    Args:
        name: 'digits' (default, embedded), 'cifar10', 'cifar100', 'imagefolder', or a folder path (CIFAR folders
            are recognised, anything else is read as an ImageFolder root).
        split: 'train' or 'test' ('val' is an alias of 'test').
        data_dir: folder of CIFAR data, or the ImageFolder root (which holds ``train/`` and ``val/``).
        train_size: use a fixed stratified subset of the training split: an int (images) or a float fraction.
            Ignored for the test split. The subset does not depend on ``seed``.
        augment: training augmentation (default: on for the train split).
        image_size: output side for ImageFolder data (default 224); digits and CIFAR are 32x32.
        seed: seed of the augmentation randomness.

    Returns:
        An :class:`ImageDataset` (:class:`ArrayImageDataset` or :class:`ImageFolderDataset`).
    """
    split = _normalize_split(split)
    augment = split == "train" if augment is None else bool(augment)
    key = str(name).lower()
    if key not in DATASETS:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)} or an existing folder, got {name!r}")
        data_dir = path
        key = _is_cifar_dir(path) or "imagefolder"

    if key == "digits":
        images, labels = load_digits_arrays()
        idx = _digits_split(split)
        if split == "train":
            sub = _subset_indices(labels[idx], train_size)
            if sub is not None:
                idx = idx[sub]
        return ArrayImageDataset(
            images[torch.from_numpy(idx)],
            torch.from_numpy(labels[idx]),
            name="digits",
            split=split,
            classes=[str(i) for i in range(10)],
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            augment=augment,
            pad=2,
            hflip=False,  # digits are not mirror-symmetric: a flipped 2 or 7 is not a 2 or 7
            seed=seed,
        )

    if data_dir is None:
        raise ValueError(f"dataset {key!r} needs data_dir (--data-dir)")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir}")

    if key in _CIFAR_LAYOUT:
        images, labels, classes = load_cifar(key, data_dir, split)
        if split == "train":
            sub = _subset_indices(labels, train_size)
            if sub is not None:
                images, labels = images[torch.from_numpy(sub)], labels[sub]
        lay = _CIFAR_LAYOUT[key]
        return ArrayImageDataset(
            images,
            torch.from_numpy(labels),
            name=key,
            split=split,
            classes=classes,
            mean=lay["mean"],
            std=lay["std"],
            augment=augment,
            pad=4,
            hflip=True,
            seed=seed,
        )

    # ImageFolder: root/train, root/val (or root/test); class folders directly under root are used for both
    candidates = ["train"] if split == "train" else ["val", "test", "validation"]
    root = next((data_dir / c for c in candidates if (data_dir / c).is_dir()), None)
    if root is None:
        if any((data_dir / c).is_dir() for c in ("train", "val", "test", "validation")):
            raise FileNotFoundError(f"no '{'/'.join(candidates)}' folder in image folder {data_dir}")
        logger.warning("%s has no train/ and val/ folders: using its class folders for the %s split", data_dir, split)
        root = data_dir
    classes = None
    if split == "test":  # keep class indices aligned with the training split
        train_root = data_dir / "train"
        if train_root.is_dir():
            classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir() and not e.name.startswith("."))
    ds = ImageFolderDataset(
        root, name="imagefolder", split=split, image_size=image_size or 224, augment=augment, seed=seed, classes=classes
    )
    if split == "train":
        sub = _subset_indices(ds.labels(), train_size)
        if sub is not None:
            ds = ds.subset(sub)
    return ds


# ----------------------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------------------
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
        num_workers: DataLoader workers (ImageFolder data only).
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
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
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
        return iter(loader)
