"""Datasets: embedded digits, CIFAR python/binary folders (restricted unpickler), ImageFolder trees, loader."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from condconv.data import (
    ArrayImageDataset,
    EpochLoader,
    ImageFolderDataset,
    build_dataset,
    load_cifar,
    restricted_pickle_load,
)
from condconv.data.digits import digits_split as _digits_split

# ------------------------------------------------------------------------------------------------ digits


def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = _digits_split("train"), _digits_split("test")
    assert len(train) == 1197 and len(test) == 600
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(1797))
    ds = build_dataset("digits", "test")
    counts = np.bincount(ds.labels(), minlength=10)
    assert counts.min() >= 57 and counts.max() <= 62  # ~60 per class
    np.testing.assert_array_equal(_digits_split("test"), test)  # fixed


def test_digits_train_size_subset_is_stratified_and_seed_independent():
    a = build_dataset("digits", "train", train_size=200, seed=0)
    b = build_dataset("digits", "train", train_size=200, seed=5)
    assert len(a) == 200 and a.num_classes == 10 and a.in_chans == 1 and a.image_size == 32
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert np.bincount(a.labels(), minlength=10).min() >= 19
    assert len(build_dataset("digits", "train", train_size=0.5)) == round(0.5 * 1197)
    assert len(build_dataset("digits", "train", train_size=5000)) == 1197
    assert len(build_dataset("digits", "test", train_size=10)) == 600  # ignored for the test split
    with pytest.raises(ValueError, match="train_size"):
        build_dataset("digits", "train", train_size=-3)
    with pytest.raises(TypeError, match="train_size"):
        build_dataset("digits", "train", train_size="many")


def test_digits_batches_normalised_and_eval_deterministic():
    ds = build_dataset("digits", "test")
    x, y = ds.get_batch(np.arange(600))
    assert x.shape == (600, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.1 and 0.85 < x.std().item() < 1.15
    x2, _ = ds.get_batch(np.arange(600), epoch=7)
    assert torch.equal(x, x2)  # no augmentation on the test split


def test_augmentation_is_a_function_of_seed_epoch_index():
    ds = build_dataset("digits", "train", train_size=100, seed=3)
    a, _ = ds.get_batch([5, 9, 11], epoch=2)
    b, _ = ds.get_batch([11, 40, 5], epoch=2)  # other batch composition
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    c, _ = ds.get_batch([5, 9, 11], epoch=3)
    assert not torch.equal(a, c)
    other_seed = build_dataset("digits", "train", train_size=100, seed=4)
    d, _ = other_seed.get_batch([5, 9, 11], epoch=2)
    assert not torch.equal(a, d)


def test_random_crop_is_a_shift_of_the_zero_padded_image():
    raw = torch.arange(2 * 6 * 6 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 6, 6, 3)
    ds = ArrayImageDataset(
        raw, torch.tensor([0, 1]), name="t", split="train", classes=["a", "b"], mean=(0, 0, 0), std=(1, 1, 1),
        augment=True, pad=2, hflip=True, seed=1,
    )  # fmt: skip
    seen_flip = set()
    for epoch in range(12):
        x, _ = ds.get_batch([0, 1], epoch=epoch)
        for i in range(2):
            img = (x[i] * 255).round().to(torch.uint8)  # (3, 6, 6)
            padded = torch.nn.functional.pad(raw[i].permute(2, 0, 1), (2, 2, 2, 2))
            windows = []
            for flip in (False, True):
                src = padded.flip(-1) if flip else padded
                for dy in range(5):
                    for dx in range(5):
                        if torch.equal(src[:, dy : dy + 6, dx : dx + 6], img):
                            windows.append(flip)
            assert windows, "augmented image is not a (flipped) crop of the padded image"
            seen_flip.update(windows)
    assert seen_flip == {False, True}


# ------------------------------------------------------------------------------------------------ loader


def test_loader_shards_resumes_and_reshuffles():
    ds = build_dataset("digits", "train", train_size=96)
    single = EpochLoader(ds, 16, shuffle=True, seed=0, drop_last=True)
    ranks = [EpochLoader(ds, 8, shuffle=True, seed=0, drop_last=True, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        assert len(single) == 6 and all(len(r) == 6 for r in ranks)
        for b, (full, r0, r1) in enumerate(zip(single.batches(), ranks[0].batches(), ranks[1].batches())):
            assert sorted(full) == sorted(r0 + r1), f"batch {b}: ranks do not split the combined batch"
            assert not set(r0) & set(r1)
        # resuming after k batches yields exactly the remaining batches
        full = [y for _, y in single.iterate(0)]
        rest = [y for _, y in single.iterate(4)]
        assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(full[4:], rest))
    single.set_epoch(0)
    order0 = single.indices()
    single.set_epoch(1)
    assert single.indices() != order0 and sorted(single.indices()) == sorted(order0)
    single.set_epoch(0)
    assert single.indices() == order0


def test_eval_loader_covers_every_image_once_across_ranks():
    ds = build_dataset("digits", "test")
    idx = []
    for r in range(3):
        loader = EpochLoader(ds, 64, rank=r, world_size=3)
        idx += loader.indices()
        assert len(loader) == -(-len(loader.indices()) // 64)
    assert sorted(idx) == list(range(600))


# ------------------------------------------------------------------------------------------------ CIFAR


def _cifar_arrays(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, num_classes, n)]


def _write_cifar10(root, fmt: str, n: int = 6) -> dict[str, tuple[np.ndarray, list[int]]]:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    content = {f: _cifar_arrays(n, 10, i) for i, f in enumerate(files)}
    if fmt == "python":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f, (data, labels) in content.items():
            with open(folder / f, "wb") as fh:
                pickle.dump({b"batch_label": f.encode(), b"labels": labels, b"data": data}, fh, protocol=2)
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, fh, protocol=2)
    else:
        folder = root / "cifar-10-batches-bin"
        folder.mkdir(parents=True)
        for f, (data, labels) in content.items():
            rec = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
            rec.tofile(folder / f"{f}.bin")
        (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return content


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar10_folders(tmp_path, fmt):
    content = _write_cifar10(tmp_path, fmt)
    images, labels, classes = load_cifar("cifar10", tmp_path, "train")
    assert images.shape == (30, 32, 32, 3) and images.dtype == torch.uint8
    assert classes == [f"c{i}" for i in range(10)]
    data0, labels0 = content["data_batch_1"]
    np.testing.assert_array_equal(labels[:6], labels0)
    # CIFAR rows are channel planes (R 1024, G 1024, B 1024) of a row-major 32x32 image
    np.testing.assert_array_equal(images[0].numpy(), data0[0].reshape(3, 32, 32).transpose(1, 2, 0))
    ds = build_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(ds) == 6 and ds.in_chans == 3 and ds.num_classes == 10
    xb, yb = next(iter(EpochLoader(ds, 4)))
    assert xb.shape == (4, 3, 32, 32) and yb.tolist() == content["test_batch"][1][:4]
    train = build_dataset("cifar10", "train", data_dir=tmp_path, train_size=20)
    assert len(train) == 20 and train.augment
    auto = build_dataset(str(tmp_path / ("cifar-10-batches-py" if fmt == "python" else "cifar-10-batches-bin")), "test")
    assert auto.name == "cifar10" and len(auto) == 6


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_cifar100_folders(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(7, 3072), dtype=np.uint8)
    fine, coarse = [int(v) for v in rng.integers(0, 100, 7)], [int(v) for v in rng.integers(0, 20, 7)]
    if fmt == "python":
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        for name in ("train", "test"):
            with open(folder / name, "wb") as fh:
                pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": coarse}, fh, protocol=4)
    else:
        folder = tmp_path / "cifar-100-binary"
        folder.mkdir()
        rec = np.concatenate([np.array(coarse, np.uint8)[:, None], np.array(fine, np.uint8)[:, None], data], axis=1)
        for name in ("train", "test"):
            rec.tofile(folder / f"{name}.bin")
    ds = build_dataset("cifar100", "train", data_dir=tmp_path)
    assert len(ds) == 7 and ds.num_classes == 100
    np.testing.assert_array_equal(ds.labels(), fine)


def test_restricted_unpickler_rejects_code_execution(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(bad / f, "wb") as fh:
            pickle.dump({"data": Evil(), "labels": [0]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*forbidden") as info:
        build_dataset("cifar10", "test", data_dir=tmp_path)
    assert "system" in str(info.value)
    assert not marker.exists()
    # a numpy array of Python objects smuggling a callable is refused as well
    with open(tmp_path / "obj.pkl", "wb") as fh:
        pickle.dump({"data": np.array([print], dtype=object)}, fh, protocol=2)
    with pytest.raises(ValueError, match="obj.pkl"):
        restricted_pickle_load(tmp_path / "obj.pkl")


def test_cifar_errors_name_the_file(tmp_path):
    _write_cifar10(tmp_path, "python")
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        build_dataset("cifar10", "train", data_dir=tmp_path)
    (folder / "test_batch").write_bytes((folder / "data_batch_1").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="test_batch"):
        build_dataset("cifar10", "test", data_dir=tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*3072"):
        build_dataset("cifar10", "test", data_dir=tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*labels"):
        build_dataset("cifar10", "test", data_dir=tmp_path)

    bin_root = tmp_path / "bin"
    _write_cifar10(bin_root, "binary")
    path = bin_root / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="test_batch.bin"):
        build_dataset("cifar10", "test", data_dir=bin_root)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_dataset("cifar10", "test", data_dir=tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", "test", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="data_dir"):
        build_dataset("cifar100", "test")
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_dataset("mnist", "test")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "holdout")


# ------------------------------------------------------------------------------------------------ ImageFolder


def _write_imagefolder(root, sizes=((40, 30), (50, 64), (33, 33))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(arr).save(d / f"img{i}.{ext}")
            Image.fromarray(rng.integers(0, 256, size=(20, 20), dtype=np.uint8), mode="L").save(d / "gray.png")
            (d / "notes.txt").write_text("not an image")


def test_imagefolder_tree(tmp_path):
    _write_imagefolder(tmp_path)
    train = build_dataset("imagefolder", "train", data_dir=tmp_path, image_size=24, seed=1)
    val = build_dataset(str(tmp_path), "val", image_size=24)
    assert isinstance(train, ImageFolderDataset) and train.classes == ["cat", "dog"] and len(train) == 8
    assert val.classes == ["cat", "dog"] and len(val) == 8 and not val.augment
    x, y = val[1]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 0
    assert torch.equal(val[1][0], x)
    train.set_epoch(2)
    a = train[3][0]
    assert torch.equal(train[3][0], a)  # same (seed, epoch, index) -> same crop
    train.set_epoch(3)
    assert not torch.equal(train[3][0], a)
    loader = EpochLoader(train, 4, shuffle=True, drop_last=True, num_workers=0)
    loader.set_epoch(0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 24, 24) and yb.shape == (4,)
    assert len(build_dataset("imagefolder", "train", data_dir=tmp_path, train_size=4)) == 4


def test_imagefolder_errors_name_the_file(tmp_path):
    _write_imagefolder(tmp_path)
    bad = tmp_path / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    val = build_dataset("imagefolder", "val", data_dir=tmp_path, image_size=16)
    index = [p for p, _ in val.samples].index(str(bad))
    with pytest.raises(ValueError, match="broken.png"):
        val[index]
    with pytest.raises(ValueError, match="broken.png"):
        list(EpochLoader(val, 16))
    os.remove(val.samples[0][0])
    with pytest.raises(FileNotFoundError, match=os.path.basename(val.samples[0][0])):
        val[0]
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        build_dataset("imagefolder", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("imagefolder", "train", data_dir=tmp_path / "nowhere")
