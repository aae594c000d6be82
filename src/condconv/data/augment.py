"""AutoAugment and RandAugment on Pillow images and uint8 arrays, with the TPU trainer's ops and magnitudes.

"CondConv: Conditionally Parameterized Convolutions for Efficient Inference" (Yang et al., arXiv 1904.04971) released
its EfficientNet-CondConv models through the ``tensorflow/tpu`` EfficientNet trainer, whose ``autoaugment.py``
implements AutoAugment ("AutoAugment: Learning Augmentation Policies from Data", Cubuk et al., arXiv 1805.09501; the
ImageNet policy ``v0``, 25 sub-policies of two ops) and RandAugment ("RandAugment: Practical automated data
augmentation with a reduced search space", Cubuk et al., arXiv 1909.13719; ``N`` ops drawn uniformly from 16, all at
magnitude ``M``; the trainer's defaults ``N=2, M=10``). This module carries over that policy table, op set and each
op's magnitude mapping (levels on a 0..10 scale, :data:`MAX_LEVEL`):

- Rotate: ``L/10 * 30`` degrees, random sign (identity at L = 0).
- ShearX, ShearY: ``L/10 * 0.3``, random sign (identity at L = 0).
- TranslateX, TranslateY: ``L/10 * translate_const`` pixels, random sign (identity at L = 0; the constant is 250 for
  AutoAugment, 100 for RandAugment).
- Cutout: a grey square of side ``2 * int(L/10 * cutout_const)`` at a uniform centre (identity at L = 0; the
  constant is 100 for AutoAugment, 40 for RandAugment).
- Posterize: keep the ``int(L/10 * 4)`` high bits (0 bits, a black image, below L = 2.5; 4 bits at L = 10).
- Solarize: invert the pixels ``>= int(L/10 * 256)`` (L = 0 inverts everything; identity at L = 10).
- SolarizeAdd: add ``int(L/10 * 110)`` to the pixels below 128, clipped (identity at L = 0).
- Color, Contrast, Brightness, Sharpness: blend with a degenerate image (grey, grey mean, black, smoothed) by the
  factor ``L/10 * 1.8 + 0.1`` (identity at L = 5, factor 1).
- AutoContrast, Equalize, Invert: no argument.

These are the TPU code's mappings, its quirks included (Posterize at levels below 2.5 keeps 0 bits; Solarize's
strength decreases with the level; at RandAugment's ``M=10`` Solarize is the identity). Differences, by choice:
Contrast blends with the grey image's mean (the TPU code's ``degenerate`` is the pixel count / 256, a known slip of
its histogram code; Pillow's ``ImageEnhance.Contrast``, which the code says it reproduces, uses the mean); geometric ops
sample with Pillow's conventions (nearest neighbour, pixel centres) and fill with grey ``replace`` = 128 as the TPU
code does; Posterize clamps its bit count to [0, 8] for magnitudes above 10.

Randomness is a pure function of the ``numpy.random.Generator`` passed in (the data pipeline derives it from
``(seed, epoch, sample index)``): the same generator state gives the same image, and a batch augmented with one
generator per image equals the images augmented one by one. Images are Pillow ``'L'``/``'RGB'`` images or uint8
arrays ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``; ops defined on colour (Color, Contrast) reduce to their grey-scale
meaning on one channel. In the TPU trainer the policy runs on the uint8 training crop after the random resized crop
and flip, before normalisation; ``translate_const`` and ``cutout_const`` are pixels at its 224-pixel crops
(``reference_size=224`` scales them to other image sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "AUGMENTATIONS", "MAX_LEVEL", "OPS", "POLICIES", "POLICY_V0", "RANDAUGMENT_OPS", "AutoAugment", "RandAugment",
    "apply_op", "augment_batch", "build_augment", "generators_from_keys",
]  # fmt: skip

MAX_LEVEL = 10.0
AUGMENTATIONS = ("none", "autoaugment", "randaugment")

# The AutoAugment ImageNet policy, ``policy_v0`` of tensorflow/tpu models/official/efficientnet/autoaugment.py:
# sub-policies of (op, probability, level).
POLICY_V0: tuple[tuple[tuple[str, float, int], ...], ...] = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
POLICIES = {"v0": POLICY_V0, "test": ((("TranslateX", 1.0, 4), ("Equalize", 1.0, 10)),)}

# RandAugment's op list, in the TPU code's order (``distort_image_with_randaugment``)
RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast", "Brightness",
    "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)  # fmt: skip


@dataclass(frozen=True)
class _Context:
    translate_const: float
    cutout_const: float
    replace: int
    reference_size: int | None

    def pixels(self, const: float, arr: np.ndarray) -> float:
        if self.reference_size is None:
            return const
        return const * min(arr.shape[0], arr.shape[1]) / self.reference_size


# ---- image <-> array ------------------------------------------------------------------------------------------------
def _to_array(image: Image.Image | np.ndarray) -> tuple[np.ndarray, str]:
    """(H, W, C) uint8 array (C = 1 or 3) and how to give the image back."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            raise ValueError(f"image mode must be 'L' or 'RGB', got {image.mode!r} (convert it first)")
        arr = np.asarray(image, dtype=np.uint8)
        return (arr[:, :, None] if arr.ndim == 2 else arr.copy()), "pil"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image must be a uint8 array, got dtype {image.dtype}")
        if image.ndim == 2:
            return image[:, :, None].copy(), "hw"
        if image.ndim == 3 and image.shape[2] in (1, 3):
            return image.copy(), "hwc"
        raise ValueError(f"image array must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    raise TypeError(f"image must be a PIL.Image.Image or a numpy uint8 array, got {type(image).__name__}")


def _from_array(arr: np.ndarray, kind: str) -> Image.Image | np.ndarray:
    if kind == "pil":
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return arr[:, :, 0] if kind == "hw" else arr


def _pil_op(arr: np.ndarray, ctx: _Context, fn: Callable[[Image.Image, int | tuple[int, ...]], Image.Image]
            ) -> np.ndarray:
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    fill = ctx.replace if arr.shape[2] == 1 else (ctx.replace,) * 3
    out = np.asarray(fn(img, fill), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


# ---- pixel ops (TPU autoaugment.py semantics) -----------------------------------------------------------------------
def _blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
    """``image1 + factor * (image2 - image1)``, clipped to [0, 255] and truncated (the TPU code's ``blend``)."""
    if factor == 0.0:
        return image1.copy()
    if factor == 1.0:
        return image2.copy()
    a, b = image1.astype(np.float32), image2.astype(np.float32)
    return np.clip(a + np.float32(factor) * (b - a), 0.0, 255.0).astype(np.uint8)


def _grey(arr: np.ndarray) -> np.ndarray:
    """Pillow's ``convert('L')`` (ITU-R 601-2 luma, fixed point), (H, W, 1); a one-channel image is itself."""
    if arr.shape[2] == 1:
        return arr.copy()
    rgb = arr.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[:, :, None]


def _color(arr: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    return _blend(np.broadcast_to(_grey(arr), arr.shape), arr, factor)


def _contrast(arr: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    mean = int(float(_grey(arr).mean()) + 0.5)
    return _blend(np.full_like(arr, mean), arr, factor)


def _brightness(arr: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    return _blend(np.zeros_like(arr), arr, factor)


def _sharpness(arr: np.ndarray, factor: float, ctx: _Context) -> np.ndarray:
    """Blend with the image smoothed by Pillow's SMOOTH kernel ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` (borders kept)."""
    h, w = arr.shape[:2]
    degenerate = arr.copy()
    if h >= 3 and w >= 3:
        x = arr.astype(np.float32)
        acc = 4.0 * x[1:-1, 1:-1]  # centre weight 5 = 1 (in the 3x3 sum below) + 4
        for dy in range(3):
            for dx in range(3):
                acc = acc + x[dy : dy + h - 2, dx : dx + w - 2]
        degenerate[1:-1, 1:-1] = np.clip(acc / 13.0, 0.0, 255.0).astype(np.uint8)
    return _blend(degenerate, arr, factor)


def _posterize(arr: np.ndarray, bits: int, ctx: _Context) -> np.ndarray:
    shift = 8 - min(max(int(bits), 0), 8)
    return arr & np.uint8((0xFF << shift) & 0xFF)


def _solarize(arr: np.ndarray, threshold: int, ctx: _Context) -> np.ndarray:
    return np.where(arr < threshold, arr, 255 - arr).astype(np.uint8)


def _solarize_add(arr: np.ndarray, addition: int, ctx: _Context, threshold: int = 128) -> np.ndarray:
    added = np.clip(arr.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(arr < threshold, added, arr)


def _invert(arr: np.ndarray, arg: None, ctx: _Context) -> np.ndarray:
    return (255 - arr).astype(np.uint8)


def _autocontrast(arr: np.ndarray, arg: None, ctx: _Context) -> np.ndarray:
    """Each channel stretched to [0, 255] (unchanged when it is flat)."""
    out = arr.copy()
    for c in range(arr.shape[2]):
        ch = arr[:, :, c].astype(np.float32)
        lo, hi = float(ch.min()), float(ch.max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            out[:, :, c] = np.clip(ch * scale - lo * scale, 0.0, 255.0).astype(np.uint8)
    return out


def _equalize(arr: np.ndarray, arg: None, ctx: _Context) -> np.ndarray:
    """Pillow's ``ImageOps.equalize`` per channel (the TPU code's ``equalize``)."""
    out = arr.copy()
    for c in range(arr.shape[2]):
        ch = arr[:, :, c]
        histo = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        nonzero = histo[histo != 0]
        step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            continue
        lut = (np.cumsum(histo) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
        out[:, :, c] = lut[ch]
    return out


def _cutout(arr: np.ndarray, arg: tuple[int, int, int], ctx: _Context) -> np.ndarray:
    pad, cy, cx = arg
    out = arr.copy()
    out[max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = ctx.replace
    return out


# ---- geometric ops (Pillow, nearest neighbour, grey fill) -----------------------------------------------------------
_NEAREST = Image.Resampling.NEAREST if hasattr(Image, "Resampling") else Image.NEAREST
_AFFINE = Image.Transform.AFFINE if hasattr(Image, "Transform") else Image.AFFINE


def _affine(data: tuple[float, ...]) -> Callable[[Image.Image, int | tuple[int, ...]], Image.Image]:
    # Pillow's affine data maps output to input coordinates, like the TPU code's projective transforms
    return lambda img, fill: img.transform(img.size, _AFFINE, data, resample=_NEAREST, fillcolor=fill)


def _rotate(arr: np.ndarray, degrees: float, ctx: _Context) -> np.ndarray:
    return _pil_op(arr, ctx, lambda img, fill: img.rotate(degrees, resample=_NEAREST, fillcolor=fill))


def _shear_x(arr: np.ndarray, level: float, ctx: _Context) -> np.ndarray:
    return _pil_op(arr, ctx, _affine((1.0, level, 0.0, 0.0, 1.0, 0.0)))


def _shear_y(arr: np.ndarray, level: float, ctx: _Context) -> np.ndarray:
    return _pil_op(arr, ctx, _affine((1.0, 0.0, 0.0, level, 1.0, 0.0)))


def _translate_x(arr: np.ndarray, pixels: float, ctx: _Context) -> np.ndarray:
    return _pil_op(arr, ctx, _affine((1.0, 0.0, pixels, 0.0, 1.0, 0.0)))


def _translate_y(arr: np.ndarray, pixels: float, ctx: _Context) -> np.ndarray:
    return _pil_op(arr, ctx, _affine((1.0, 0.0, 0.0, 0.0, 1.0, pixels)))


# ---- level -> argument (TPU ``level_to_arg``) -----------------------------------------------------------------------
def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _enhance_arg(level: float, arr: np.ndarray, ctx: _Context, rng: np.random.Generator) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


def _cutout_arg(level: float, arr: np.ndarray, ctx: _Context, rng: np.random.Generator) -> tuple[int, int, int]:
    pad = int(level / MAX_LEVEL * ctx.pixels(ctx.cutout_const, arr))
    return pad, int(rng.integers(0, arr.shape[0])), int(rng.integers(0, arr.shape[1]))


def _translate_arg(level: float, arr: np.ndarray, ctx: _Context, rng: np.random.Generator) -> float:
    return _signed(level / MAX_LEVEL * ctx.pixels(ctx.translate_const, arr), rng)


def _no_arg(level: float, arr: np.ndarray, ctx: _Context, rng: np.random.Generator) -> None:
    return None


_ArgFn = Callable[[float, np.ndarray, _Context, np.random.Generator], object]
_OpFn = Callable[[np.ndarray, object, _Context], np.ndarray]

OPS: dict[str, tuple[_OpFn, _ArgFn]] = {
    "AutoContrast": (_autocontrast, _no_arg),
    "Equalize": (_equalize, _no_arg),
    "Invert": (_invert, _no_arg),
    "Rotate": (_rotate, lambda level, arr, ctx, rng: _signed(level / MAX_LEVEL * 30.0, rng)),
    "Posterize": (_posterize, lambda level, arr, ctx, rng: int(level / MAX_LEVEL * 4)),
    "Solarize": (_solarize, lambda level, arr, ctx, rng: int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": (_solarize_add, lambda level, arr, ctx, rng: int(level / MAX_LEVEL * 110)),
    "Color": (_color, _enhance_arg),
    "Contrast": (_contrast, _enhance_arg),
    "Brightness": (_brightness, _enhance_arg),
    "Sharpness": (_sharpness, _enhance_arg),
    "ShearX": (_shear_x, lambda level, arr, ctx, rng: _signed(level / MAX_LEVEL * 0.3, rng)),
    "ShearY": (_shear_y, lambda level, arr, ctx, rng: _signed(level / MAX_LEVEL * 0.3, rng)),
    "TranslateX": (_translate_x, _translate_arg),
    "TranslateY": (_translate_y, _translate_arg),
    "Cutout": (_cutout, _cutout_arg),
}


# ---- public API -----------------------------------------------------------------------------------------------------
def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_level(level: object, name: str = "level") -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.integer, np.floating)) \
            or not math.isfinite(level) or level < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {level!r}")
    return float(level)


def _context(translate_const: float, cutout_const: float, replace: int, reference_size: int | None) -> _Context:
    for name, value in (("translate_const", translate_const), ("cutout_const", cutout_const)):
        _check_level(value, name)
    if isinstance(replace, bool) or not isinstance(replace, (int, np.integer)) or not 0 <= replace <= 255:
        raise ValueError(f"replace must be an int in [0, 255], got {replace!r}")
    if reference_size is not None and (isinstance(reference_size, bool) or not isinstance(reference_size, int)
                                       or reference_size < 1):
        raise ValueError(f"reference_size must be an int >= 1 or None, got {reference_size!r}")
    return _Context(float(translate_const), float(cutout_const), int(replace), reference_size)


def _run(arr: np.ndarray, name: str, level: float, rng: np.random.Generator, ctx: _Context) -> np.ndarray:
    op, to_arg = OPS[name]
    return op(arr, to_arg(level, arr, ctx, rng), ctx)


def apply_op(image: Image.Image | np.ndarray, name: str, level: float, rng: np.random.Generator, *,
             translate_const: float = 250.0, cutout_const: float = 100.0, replace: int = 128,
             reference_size: int | None = None) -> Image.Image | np.ndarray:
    """Apply one op of :data:`OPS` at ``level`` (0..10 scale; see the module table). Returns the same type and shape.

    Args:
        image: Pillow 'L'/'RGB' image or uint8 array (H, W), (H, W, 1) or (H, W, 3).
        name: op name ('Rotate', 'Equalize', ...).
        level: magnitude (>= 0; 10 is the TPU code's maximum).
        rng: the random signs and cutout positions are drawn from it.
        translate_const, cutout_const: pixels at level 10 (TPU AutoAugment's 250 and 100 by default).
        replace: grey level filling pixels moved in from outside, and the cutout square.
        reference_size: image side the pixel constants refer to (None: as given).
    """
    if name not in OPS:
        raise ValueError(f"name must be one of {', '.join(OPS)}, got {name!r}")
    level = _check_level(level)
    ctx = _context(translate_const, cutout_const, replace, reference_size)
    arr, kind = _to_array(image)
    return _from_array(_run(arr, name, level, _check_rng(rng), ctx), kind)


class AutoAugment:
    """AutoAugment: one sub-policy drawn uniformly, each of its ops applied with its probability at its level.

    Args:
        policy: ``'v0'`` (the TPU code's ImageNet policy, default), ``'test'``, or a sequence of sub-policies of
            ``(op, probability, level)``.
        translate_const, cutout_const: pixels at level 10 (the TPU code's AutoAugment values 250 and 100).
        replace: fill grey level (128). reference_size: image side the constants refer to (None: as given).
    """

    def __init__(self, policy: str | Sequence[Sequence[tuple[str, float, float]]] = "v0", *,
                 translate_const: float = 250.0, cutout_const: float = 100.0, replace: int = 128,
                 reference_size: int | None = None) -> None:
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"policy must be one of {', '.join(POLICIES)} or a list of sub-policies, "
                                 f"got {policy!r}")
            policy = POLICIES[policy]
        subs = []
        for sub in policy:
            ops = []
            for item in sub:
                name, prob, level = item
                if name not in OPS:
                    raise ValueError(f"policy op must be one of {', '.join(OPS)}, got {name!r}")
                if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
                    raise ValueError(f"policy probability must be in [0, 1], got {prob!r}")
                ops.append((name, float(prob), _check_level(level)))
            subs.append(tuple(ops))
        if not subs:
            raise ValueError("policy must hold at least one sub-policy")
        self.policy = tuple(subs)
        self.ctx = _context(translate_const, cutout_const, replace, reference_size)

    def __call__(self, image: Image.Image | np.ndarray, rng: np.random.Generator) -> Image.Image | np.ndarray:
        """The augmented image (same type and shape), a pure function of ``image`` and ``rng``'s state."""
        rng = _check_rng(rng)
        arr, kind = _to_array(image)
        for name, prob, level in self.policy[int(rng.integers(len(self.policy)))]:
            if rng.random() < prob:
                arr = _run(arr, name, level, rng, self.ctx)
        return _from_array(arr, kind)

    def __repr__(self) -> str:
        return f"AutoAugment({len(self.policy)} sub-policies)"


class RandAugment:
    """RandAugment: ``num_layers`` ops drawn uniformly from :data:`RANDAUGMENT_OPS`, each at ``magnitude``.

    As in the TPU code every drawn op is applied (its per-op probability is unused by these ops).

    Args:
        num_layers: ops per image (``N``; TPU default 2).
        magnitude: level of every op (``M``; TPU default 10; EfficientNet-B7 used 28: above 10 the linear mappings
            extrapolate).
        translate_const, cutout_const: pixels at level 10 (the TPU code's RandAugment values 100 and 40).
        replace: fill grey level (128). reference_size: image side the constants refer to (None: as given).
    """

    def __init__(self, num_layers: int = 2, magnitude: float = 10.0, *, translate_const: float = 100.0,
                 cutout_const: float = 40.0, replace: int = 128, reference_size: int | None = None) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}")
        self.num_layers, self.magnitude = num_layers, _check_level(magnitude, "magnitude")
        self.ctx = _context(translate_const, cutout_const, replace, reference_size)

    def __call__(self, image: Image.Image | np.ndarray, rng: np.random.Generator) -> Image.Image | np.ndarray:
        """The augmented image (same type and shape), a pure function of ``image`` and ``rng``'s state."""
        rng = _check_rng(rng)
        arr, kind = _to_array(image)
        for _ in range(self.num_layers):
            name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
            arr = _run(arr, name, self.magnitude, rng, self.ctx)
        return _from_array(arr, kind)

    def __repr__(self) -> str:
        return f"RandAugment(num_layers={self.num_layers}, magnitude={self.magnitude:g})"


Policy = Callable[[Image.Image | np.ndarray, np.random.Generator], Image.Image | np.ndarray]


def build_augment(name: str | None, *, randaug_layers: int = 2, randaug_magnitude: float = 10.0,
                  reference_size: int | None = None) -> AutoAugment | RandAugment | None:
    """The policy named by a training option: ``'none'``/None (no policy), ``'autoaugment'`` (v0) or
    ``'randaugment'`` (``randaug_layers``, ``randaug_magnitude``)."""
    if name is None or name == "none":
        return None
    if name == "autoaugment":
        return AutoAugment("v0", reference_size=reference_size)
    if name == "randaugment":
        return RandAugment(randaug_layers, randaug_magnitude, reference_size=reference_size)
    raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")


def generators_from_keys(keys: Sequence[int] | np.ndarray) -> list[np.random.Generator]:
    """One ``numpy.random.Generator`` per integer key (e.g. ``condconv.data.base.sample_keys``' uint64 keys)."""
    return [np.random.default_rng(int(k)) for k in np.asarray(keys).reshape(-1)]


def augment_batch(images: torch.Tensor | np.ndarray, policy: Policy,
                  rngs: Sequence[np.random.Generator] | np.ndarray) -> torch.Tensor | np.ndarray:
    """Apply ``policy`` to each image of a uint8 batch (N, H, W, C), C = 1 or 3, through Pillow.

    Args:
        images: uint8 tensor or array (N, H, W, C) (the in-memory datasets' layout).
        policy: an :class:`AutoAugment`, :class:`RandAugment` or any ``f(image, rng) -> image``.
        rngs: one generator per image, or N integer keys (see :func:`generators_from_keys`).

    Returns:
        The augmented batch, of the input's type, dtype and shape; image ``i`` is ``policy(images[i], rngs[i])``.
    """
    is_tensor = isinstance(images, torch.Tensor)
    arr = images.detach().cpu().numpy() if is_tensor else images
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3):
        desc = f"{arr.dtype} {tuple(arr.shape)}" if hasattr(arr, "shape") else type(images).__name__
        raise ValueError(f"images must be a uint8 batch (N, H, W, C) with C = 1 or 3, got {desc}")
    if not callable(policy):
        raise TypeError(f"policy must be callable, got {type(policy).__name__}")
    if isinstance(rngs, np.ndarray) or (len(rngs) and not isinstance(rngs[0], np.random.Generator)):
        rngs = generators_from_keys(rngs)
    if len(rngs) != arr.shape[0]:
        raise ValueError(f"rngs must hold one generator per image ({arr.shape[0]}), got {len(rngs)}")
    out = np.stack([np.asarray(policy(arr[i], rngs[i]), dtype=np.uint8).reshape(arr.shape[1:])
                    for i in range(arr.shape[0])]) if arr.shape[0] else arr.copy()
    return torch.from_numpy(out).to(images.device) if is_tensor else out
