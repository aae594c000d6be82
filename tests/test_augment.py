"""AutoAugment / RandAugment: every op on RGB and grey images, the TPU code's magnitude mappings, identities,
determinism from the generator, and batch == per-image application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from condconv.data.augment import (
    OPS,
    POLICY_V0,
    RANDAUGMENT_OPS,
    AutoAugment,
    RandAugment,
    apply_op,
    augment_batch,
    build_augment,
    generators_from_keys,
)


def _array(shape, seed=0, low=20, high=230):
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("level", [0, 3.5, 10])
def test_every_op_keeps_size_mode_and_dtype_on_rgb_and_grey(name, level):
    for image in (Image.fromarray(_array((24, 30, 3))), Image.fromarray(_array((24, 30))),
                  _array((24, 30, 3)), _array((24, 30, 1)), _array((24, 30))):
        out = apply_op(image, name, level, _rng())
        if isinstance(image, Image.Image):
            assert isinstance(out, Image.Image) and out.mode == image.mode and out.size == image.size
        else:
            assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == image.shape


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd", "Cutout"])
def test_magnitude_zero_is_the_identity(name):
    for arr in (_array((20, 20, 3)), _array((20, 20, 1))):
        for seed in range(4):  # either random sign
            np.testing.assert_array_equal(apply_op(arr, name, 0, _rng(seed)), arr)


def test_identities_at_other_levels():
    arr = _array((16, 16, 3))
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):  # factor 5/10 * 1.8 + 0.1 = 1
        np.testing.assert_array_equal(apply_op(arr, name, 5, _rng()), arr)
    np.testing.assert_array_equal(apply_op(arr, "Solarize", 10, _rng()), arr)  # threshold 256
    grey = _array((16, 16, 1))
    np.testing.assert_array_equal(apply_op(grey, "Color", 0, _rng()), grey)  # colour ops: grey is already grey


def test_pixel_op_mappings():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(apply_op(arr, "Invert", 7, _rng()), 255 - arr)
    np.testing.assert_array_equal(apply_op(arr, "Posterize", 10, _rng()), arr & 0xF0)  # int(10/10 * 4) = 4 bits
    np.testing.assert_array_equal(apply_op(arr, "Posterize", 2, _rng()), np.zeros_like(arr))  # 0 bits: TF's quirk
    threshold = int(6 / 10 * 256)
    np.testing.assert_array_equal(apply_op(arr, "Solarize", 6, _rng()), np.where(arr < threshold, arr, 255 - arr))
    np.testing.assert_array_equal(apply_op(arr, "Solarize", 0, _rng()), 255 - arr)  # TF: level 0 inverts all
    add = int(3 / 10 * 110)
    expected = np.where(arr < 128, np.clip(arr.astype(int) + add, 0, 255), arr).astype(np.uint8)
    np.testing.assert_array_equal(apply_op(arr, "SolarizeAdd", 3, _rng()), expected)


def test_enhance_and_histogram_ops_match_pillow():
    for arr in (_array((23, 29, 3)), _array((23, 29))):
        img = Image.fromarray(arr)
        assert np.array_equal(np.asarray(apply_op(img, "Equalize", 0, _rng())), np.asarray(ImageOps.equalize(img)))
        ours = np.asarray(apply_op(img, "AutoContrast", 0, _rng())).astype(int)
        assert np.abs(ours - np.asarray(ImageOps.autocontrast(img)).astype(int)).max() <= 1
        for level in (1, 8):
            factor = level / 10 * 1.8 + 0.1
            for name, enhancer, tol in (("Color", ImageEnhance.Color, 0), ("Contrast", ImageEnhance.Contrast, 0),
                                        ("Brightness", ImageEnhance.Brightness, 0),
                                        ("Sharpness", ImageEnhance.Sharpness, 1)):
                ours = np.asarray(apply_op(img, name, level, _rng())).astype(int)
                theirs = np.asarray(enhancer(img).enhance(factor)).astype(int)
                assert np.abs(ours - theirs).max() <= tol, (name, level, arr.ndim)


def test_geometric_ops_move_pixels_and_fill_grey():
    arr = _array((12, 12, 3))
    for seed in range(6):
        out = apply_op(arr, "TranslateX", 10, _rng(seed), translate_const=3)
        if np.array_equal(out[:, :-3], arr[:, 3:]):  # content moved left by 3, grey enters on the right
            assert (out[:, -3:] == 128).all()
        else:
            assert np.array_equal(out[:, 3:], arr[:, :-3]) and (out[:, :3] == 128).all()
    # the relative constant: 250 pixels at 224 is 12 * 250 / 224 = 13.4 >= the image: everything grey
    assert (apply_op(arr, "TranslateY", 10, _rng(), reference_size=224, translate_const=250) == 128).all()
    rotated = apply_op(arr, "Rotate", 10, _rng(), replace=7)  # 30 degrees: corners come from outside
    assert rotated[0, 0].tolist() == [7, 7, 7]


def test_cutout_square_and_position_from_the_generator():
    arr = np.zeros((32, 32, 1), dtype=np.uint8)
    out = apply_op(arr, "Cutout", 10, _rng(3), cutout_const=4)
    rows, cols = np.nonzero(out[:, :, 0] == 128)
    assert rows.max() - rows.min() + 1 <= 8 and cols.max() - cols.min() + 1 <= 8 and len(rows) <= 64
    np.testing.assert_array_equal(out, apply_op(arr, "Cutout", 10, _rng(3), cutout_const=4))


def test_policy_v0_table():
    assert len(POLICY_V0) == 25 and all(len(sub) == 2 for sub in POLICY_V0)
    assert POLICY_V0[0] == (("Equalize", 0.8, 1), ("ShearY", 0.8, 4))
    assert POLICY_V0[15] == (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9))
    assert POLICY_V0[-1] == (("Color", 0.8, 6), ("Rotate", 0.4, 5))
    assert all(op in OPS and 0 <= p <= 1 and 0 <= level <= 10 for sub in POLICY_V0 for op, p, level in sub)
    assert len(RANDAUGMENT_OPS) == 16 and set(RANDAUGMENT_OPS) == set(OPS)


@pytest.mark.parametrize("policy", [AutoAugment(), RandAugment(2, 9), RandAugment(3, 15)])
def test_same_generator_state_same_image(policy):
    for arr in (_array((28, 28, 3)), _array((28, 28, 1))):
        outs = [policy(arr, _rng(11)) for _ in range(2)]
        np.testing.assert_array_equal(outs[0], outs[1])
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        np.testing.assert_array_equal(np.asarray(policy(img, _rng(11))).reshape(arr.shape), outs[0])
    assert any(not np.array_equal(policy(arr, _rng(s)), policy(arr, _rng(s + 1))) for s in range(5))


def test_batch_equals_per_image_application_tensor_and_array():
    policy = AutoAugment()
    keys = np.array([3, 99, 12345, 2**63 + 5], dtype=np.uint64)
    for channels in (1, 3):  # the digits' (N, 32, 32, 1) and CIFAR's (N, 32, 32, 3)
        batch = torch.from_numpy(_array((4, 32, 32, channels), seed=channels))
        out = augment_batch(batch, policy, keys)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == batch.shape
        for i, rng in enumerate(generators_from_keys(keys)):
            np.testing.assert_array_equal(out[i].numpy(), policy(batch[i].numpy(), rng))
        as_array = augment_batch(batch.numpy(), policy, generators_from_keys(keys))
        np.testing.assert_array_equal(as_array, out.numpy())
    empty = torch.zeros((0, 8, 8, 3), dtype=torch.uint8)
    assert augment_batch(empty, policy, []).shape == empty.shape


def test_build_augment_names():
    assert build_augment("none") is None and build_augment(None) is None
    assert isinstance(build_augment("autoaugment"), AutoAugment)
    ra = build_augment("randaugment", randaug_layers=1, randaug_magnitude=7)
    assert (ra.num_layers, ra.magnitude) == (1, 7.0)
    arr = _array((8, 8, 3))
    np.testing.assert_array_equal(RandAugment(0, 10)(arr, _rng()), arr)
    with pytest.raises(ValueError, match="augment"):
        build_augment("trivialaugment")


def test_bad_inputs_are_named():
    arr = _array((8, 8, 3))
    with pytest.raises(ValueError, match="name"):
        apply_op(arr, "Blur", 1, _rng())
    with pytest.raises(ValueError, match="level"):
        apply_op(arr, "Rotate", -1, _rng())
    with pytest.raises(TypeError, match="rng"):
        apply_op(arr, "Rotate", 1, 0)
    with pytest.raises(TypeError, match="uint8"):
        apply_op(arr.astype(np.float32), "Rotate", 1, _rng())
    with pytest.raises(ValueError, match="mode"):
        apply_op(Image.new("RGBA", (4, 4)), "Rotate", 1, _rng())
    with pytest.raises(ValueError, match="shape"):
        apply_op(np.zeros((4, 4, 2), np.uint8), "Rotate", 1, _rng())
    with pytest.raises(ValueError, match="replace"):
        AutoAugment(replace=300)
    with pytest.raises(ValueError, match="policy"):
        AutoAugment("v9")
    with pytest.raises(ValueError, match="num_layers"):
        RandAugment(-1)
    with pytest.raises(ValueError, match="images"):
        augment_batch(torch.zeros((2, 8, 8, 3)), AutoAugment(), [_rng(), _rng()])
    with pytest.raises(ValueError, match="rngs"):
        augment_batch(torch.zeros((2, 8, 8, 3), dtype=torch.uint8), AutoAugment(), [_rng()])
