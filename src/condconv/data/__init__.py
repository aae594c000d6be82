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

from condconv.data.base import ArrayImageDataset, ImageDataset, sample_keys
from condconv.data.build import DATASETS, build_dataset
from condconv.data.cifar import load_cifar, restricted_pickle_load
from condconv.data.digits import load_digits_arrays
from condconv.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataset
from condconv.data.loader import EpochLoader

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
