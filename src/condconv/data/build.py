"""Datasets by name: :func:`build_dataset`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from condconv.data.base import ArrayImageDataset, ImageDataset, subset_indices
from condconv.data.cifar import CIFAR_LAYOUT, find_cifar, load_cifar
from condconv.data.digits import DIGITS_MEAN, DIGITS_STD, digits_split, load_digits_arrays
from condconv.data.imagefolder import ImageFolderDataset
from condconv.models.pretrained import EvalConfig
from condconv.utils.checks import OptionError

__all__ = ["DATASETS", "build_dataset"]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


def _normalize_split(split: str) -> str:
    s = str(split).lower()
    if s in ("train", "training"):
        return "train"
    if s in ("test", "val", "valid", "validation", "eval"):
        return "test"
    raise OptionError("split", f"split must be 'train' or 'test' (alias 'val'), got {split!r}")


def _is_cifar_dir(path: Path) -> str | None:
    for name in CIFAR_LAYOUT:
        try:
            find_cifar(name, path)
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
    preprocess: EvalConfig | None = None,
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
        preprocess: ImageFolder only: a published model's evaluation preprocessing
            (:func:`condconv.models.pretrained.eval_config`), used for the evaluation split.

    Returns:
        An :class:`ImageDataset` (:class:`ArrayImageDataset` or :class:`ImageFolderDataset`).
    """
    split = _normalize_split(split)
    augment = split == "train" if augment is None else bool(augment)
    key = str(name).lower()
    if key not in DATASETS:
        path = Path(name)
        if not path.is_dir():
            raise OptionError("dataset", f"dataset must be one of {', '.join(DATASETS)} or an existing folder, got "
                              f"{name!r}")
        data_dir = path
        key = _is_cifar_dir(path) or "imagefolder"

    if key == "digits":
        return _digits(split, train_size, augment, seed)
    if data_dir is None:
        raise OptionError("data_dir", f"data_dir is needed for dataset {key!r}: the folder of its files")
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    if key in CIFAR_LAYOUT:
        return _cifar(key, data_dir, split, train_size, augment, seed)
    if preprocess is not None and key != "imagefolder":
        raise OptionError("preprocess", f"a published model's preprocessing applies to ImageFolder data, not {key!r}")
    return _image_folder(data_dir, split, train_size, augment, image_size, seed, preprocess)


def _digits(split: str, train_size, augment: bool, seed: int) -> ArrayImageDataset:
    images, labels = load_digits_arrays()
    idx = digits_split(split)
    if split == "train":
        sub = subset_indices(labels[idx], train_size)
        if sub is not None:
            idx = idx[sub]
    return ArrayImageDataset(
        images[torch.from_numpy(idx)], torch.from_numpy(labels[idx]), name="digits", split=split,
        classes=[str(i) for i in range(10)], mean=DIGITS_MEAN, std=DIGITS_STD, augment=augment, pad=2,
        hflip=False,  # digits are not mirror-symmetric: a flipped 2 or 7 is not a 2 or 7
        seed=seed,
    )  # fmt: skip


def _cifar(key: str, data_dir: Path, split: str, train_size, augment: bool, seed: int) -> ArrayImageDataset:
    images, labels, classes = load_cifar(key, data_dir, split)
    if split == "train":
        sub = subset_indices(labels, train_size)
        if sub is not None:
            images, labels = images[torch.from_numpy(sub)], labels[sub]
    lay = CIFAR_LAYOUT[key]
    return ArrayImageDataset(images, torch.from_numpy(labels), name=key, split=split, classes=classes,
                             mean=lay["mean"], std=lay["std"], augment=augment, pad=4, hflip=True, seed=seed)


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_folder(data_dir: Path, split: str, train_size, augment: bool, image_size: int | None,
                  seed: int, preprocess: EvalConfig | None = None) -> ImageFolderDataset:
    """``root/train`` and ``root/val`` (or ``root/test``); class folders directly under the root serve both."""
    candidates = ["train"] if split == "train" else ["val", "test", "validation"]
    root = next((data_dir / c for c in candidates if (data_dir / c).is_dir()), None)
    if root is None:
        if any((data_dir / c).is_dir() for c in ("train", "val", "test", "validation")):
            raise FileNotFoundError(f"no '{'/'.join(candidates)}' folder in image folder {data_dir}")
        logger.warning("%s has no train/ and val/ folders: using its class folders for the %s split", data_dir, split)
        root = data_dir
    classes = None
    if split == "test" and (data_dir / "train").is_dir():  # keep class indices aligned with the training split
        classes = _class_folders(data_dir / "train")
        extra = sorted(set(_class_folders(root)) - set(classes))
        if extra:
            logger.warning("%s: class folder(s) %s are not in %s and are left out of evaluation", root,
                           ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""), data_dir / "train")
    ds = ImageFolderDataset(root, name="imagefolder", split=split, image_size=image_size or 224, augment=augment,
                            seed=seed, classes=classes, preprocess=preprocess)
    if split == "train":
        sub = subset_indices(ds.labels(), train_size)
        if sub is not None:
            ds = ds.subset(sub)
    return ds
