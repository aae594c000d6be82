"""CIFAR-10/100 from the official folders in python (pickle) or binary format; nothing is downloaded.

The pickles are read by a *restricted* unpickler that only rebuilds numpy arrays, dtypes and plain containers, so a
tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["CIFAR_LAYOUT", "find_cifar", "load_cifar", "restricted_pickle_load"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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


CIFAR_LAYOUT = {
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


def find_cifar(name: str, data_dir: Path) -> tuple[str, Path]:
    lay = CIFAR_LAYOUT[name]
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
    lay = CIFAR_LAYOUT[name]
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
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    lay = CIFAR_LAYOUT[name]
    fmt, folder = find_cifar(name, Path(data_dir))
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
