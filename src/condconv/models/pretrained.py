"""Trained weights of other codes, loaded into the zoo's models by name: the file's format is recognised from its
contents, its keys are mapped to condconv's names, and nothing is loaded partially.

Two tables drive it:

- :data:`FORMATS`: how a file is wrapped (what it is, how to tell, where its tensors are): condconv's own weights
  (``model.safetensors`` with its config, or a run / checkpoint folder); the official ODConv training checkpoint
  (Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947; OSVAI/ODConv ``main.py``
  saves ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` from a (Distributed)DataParallel model, keys
  prefixed ``module.``); a plain state_dict (timm's ``.pth`` / ``.bin`` / ``.safetensors``). A new format (e.g.
  KernelWarehouse's ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``) is one more :class:`SourceFormat`.
- :data:`LAYOUTS`: how the tensors are named (which network wrote them), each with its key mapping: condconv's
  own names; torchvision-style ResNets (the official ODConv ``resnet.py`` / ``od_resnet.py``, torchvision, timm);
  torchvision-style MobileNetV2 (the official ODConv ``mobilenetv2.py`` / ``od_mobilenetv2.py``, torchvision);
  timm's EfficientNets (``efficientnet_b0``, ``tf_efficientnet_cc_b0_8e``, ...: Yang et al., "CondConv", NeurIPS
  2019, arXiv:1904.04971, with experts stored flattened ``[E, out * in/g * kh * kw]`` and the block routing in
  ``routing_fn``).

Old pickles are read with ``torch.load(weights_only=True)`` only: a file holding anything but tensors, numbers and
plain containers is refused, never executed.

Example:
    >>> import condconv
    >>> model = condconv.create_model("odconv_resnet18_4x", pretrained="od_resnet18_4x.pth.tar")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from condconv.models import kernelwarehouse_weights as kw_weights
from condconv.models.checkpoint import CONFIG_METADATA_KEY, _torch_load, read_weights, resolve_weights_path
from condconv.utils.runtime import unwrap

__all__ = ["SourceFormat", "Layout", "FORMATS", "LAYOUTS", "read_pretrained", "load_pretrained", "PretrainedFile",
           "EvalConfig", "Published", "PUBLISHED", "eval_config", "published"]

#: condconv state_dict entries that other codes do not store: the routers' temperature buffers (the sources keep the
#: temperature as a plain attribute, 1 after training); the model's own values are kept.
_NOT_STORED = re.compile(r"(^|\.)router\.temperature$")


@dataclass
class _Raw:
    """A file as read: ``obj`` is the unpickled object or the safetensors tensors; ``metadata`` safetensors' only."""

    path: Path
    obj: Any
    metadata: dict[str, str] | None


@dataclass(frozen=True)
class SourceFormat:
    """How one kind of file wraps its weights.

    Attributes:
        name: short name (``'odconv'``). what: what the file is, for messages.
        detect: ``_Raw -> bool``: the file is of this format (tried in :data:`FORMATS` order).
        tensors: ``_Raw -> dict``: the state_dict in the source's own names (wrappers and ``module.`` removed).
    """

    name: str
    what: str
    detect: Callable[[_Raw], bool]
    tensors: Callable[[_Raw], dict[str, Tensor]]


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``module.`` prefix that (Distributed)DataParallel puts on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _all_tensors(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _odconv_detect(raw: _Raw) -> bool:
    obj = raw.obj
    return isinstance(obj, dict) and _all_tensors(obj.get("state_dict")) and "best_acc" in obj and "epoch" in obj


_WRAPPERS = ("state_dict", "model", "model_state_dict")


def _wrapped(raw: _Raw) -> str | None:
    """The key under which a training script's checkpoint dict holds its state_dict, or None."""
    obj = raw.obj
    return next((k for k in _WRAPPERS if isinstance(obj, dict) and _all_tensors(obj.get(k))), None)


#: tried in order: a more specific format (e.g. KernelWarehouse's ``{'model', 'optimizer', 'epoch', 'scaler',
#: 'args'}``) goes before the generic ``wrapped`` and ``state_dict`` entries
FORMATS: tuple[SourceFormat, ...] = (
    SourceFormat("condconv", "a condconv weights file (condconv train / convert / import)",
                 lambda raw: raw.metadata is not None and CONFIG_METADATA_KEY in raw.metadata,
                 lambda raw: dict(raw.obj)),
    SourceFormat("odconv", "an official ODConv training checkpoint (OSVAI/ODConv main.py: epoch, state_dict, acc, "
                 "best_acc, optimizer)", _odconv_detect, lambda raw: _strip_module(raw.obj["state_dict"])),
    SourceFormat("kernelwarehouse", "an official KernelWarehouse checkpoint (OSVAI/KernelWarehouse main.py: model, "
                 "optimizer, epoch, scaler, args)", lambda raw: kw_weights.detect(raw.obj),
                 lambda raw: kw_weights.convert_state_dict(raw.obj["model"])),
    SourceFormat("wrapped", "a training checkpoint with its state_dict under 'state_dict', 'model' or "
                 "'model_state_dict'", lambda raw: _wrapped(raw) is not None,
                 lambda raw: _strip_module(raw.obj[_wrapped(raw)])),
    SourceFormat("state_dict", "a plain state_dict (timm, torchvision)", lambda raw: _all_tensors(raw.obj),
                 lambda raw: _strip_module(raw.obj)),
)


# ----------------------------------------------------------------------------------------------------------------
# layouts: key names -> condconv names
# ----------------------------------------------------------------------------------------------------------------
#: a renamed key: (condconv name, how the tensor may be reshaped: '' none, 'squeeze' a 1x1 convolution's
#: [out, in, 1, 1] to a linear layer's [out, in], 'experts' timm's flattened [E, out * in/g * kh * kw])
Renamed = tuple[str, str]


@dataclass(frozen=True)
class Layout:
    """How a network names its tensors, and the mapping of those names to condconv's.

    Attributes:
        name: short name. what: the naming, for messages.
        detect: ``keys -> bool`` (tried in :data:`LAYOUTS` order).
        rename: ``state -> {source key: (condconv key, reshape)}``: keys it cannot place are left out.
        guess: ``state -> str``: the model that wrote the file, as far as its tensors tell.
    """

    name: str
    what: str
    detect: Callable[[set[str]], bool]
    rename: Callable[[Mapping[str, Tensor]], dict[str, Renamed]]
    guess: Callable[[Mapping[str, Tensor]], str]


def _counts(keys, pattern: str) -> dict[int, int]:
    """``{group index: number of members}`` for keys matching ``pattern`` with groups (group, member)."""
    found: dict[int, set[int]] = {}
    for key in keys:
        match = re.match(pattern, key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return {g: max(members) + 1 for g, members in sorted(found.items())}


_ODCONV_HEADS = {"fc": "fc", "bn": "norm", "channel_fc": "in_channel", "filter_fc": "out_channel",
                 "spatial_fc": "spatial", "kernel_fc": "expert"}


def _conv_tail(rest: str) -> Renamed | None:
    """A convolution's own tail (``weight``, or an official ODConv ``attention.*`` entry) in condconv's names."""
    if rest == "weight":
        return "weight", ""
    match = re.fullmatch(r"attention\.(\w+)\.(\w+)", rest)
    if match and match.group(1) in _ODCONV_HEADS:
        return f"router.{_ODCONV_HEADS[match.group(1)]}.{match.group(2)}", "squeeze"
    return None


def _resnet_rename(state: Mapping[str, Tensor]) -> dict[str, Renamed]:
    blocks = _counts(state, r"layer(\d+)\.(\d+)\.")
    start, first = {}, 1  # blocks.0 is the max-pool
    for layer, count in blocks.items():
        start[layer], first = first, first + count
    out: dict[str, Renamed] = {}
    for key in state:
        target = None
        if match := re.fullmatch(r"conv1\.weight", key):
            target = ("stem.conv.weight", "")
        elif match := re.fullmatch(r"bn1\.(\w+)", key):
            target = (f"stem.bn.{match.group(1)}", "")
        elif match := re.fullmatch(r"fc\.(\w+)", key):
            target = (f"head.fc.{match.group(1)}", "")
        elif match := re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", key):
            prefix = f"blocks.{start[int(match.group(1))] + int(match.group(2))}"
            rest = match.group(3)
            if inner := re.fullmatch(r"conv(\d)\.(.+)", rest):
                tail = _conv_tail(inner.group(2))
                target = None if tail is None else (f"{prefix}.conv{inner.group(1)}.conv.{tail[0]}", tail[1])
            elif inner := re.fullmatch(r"bn(\d)\.(\w+)", rest):
                target = (f"{prefix}.conv{inner.group(1)}.bn.{inner.group(2)}", "")
            elif inner := re.fullmatch(r"downsample\.([01])\.(\w+)", rest):
                part = "conv" if inner.group(1) == "0" else "bn"
                target = (f"{prefix}.downsample.{part}.{inner.group(2)}", "")
        if target is not None:
            out[key] = target
    return out


def _experts(state: Mapping[str, Tensor], key: str) -> int | None:
    weight = state.get(key)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 5 else None


def _resnet_guess(state: Mapping[str, Tensor]) -> str:
    blocks = _counts(state, r"layer(\d+)\.(\d+)\.")
    bottleneck = "layer1.0.conv3.weight" in state
    depth = sum(blocks.values()) * (3 if bottleneck else 2) + 2
    experts = _experts(state, "layer1.0.conv1.weight")
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else "?"
    if experts is None:
        return f"resnet{depth} ({classes} classes)"
    return f"od_resnet{depth} with kernel_num={experts} ({classes} classes)"


def _mbv2_rename(state: Mapping[str, Tensor]) -> dict[str, Renamed]:
    features = [int(m.group(1)) for k in state if (m := re.match(r"features\.(\d+)\.", k))]
    last = max(features, default=0)
    out: dict[str, Renamed] = {}
    for key in state:
        target = None
        if match := re.fullmatch(r"features\.(\d+)\.([01])\.(.+)", key):
            index, part, rest = int(match.group(1)), match.group(2), match.group(3)
            where = "stem" if index == 0 else "head_conv" if index == last else None
            if where is not None:
                tail = _conv_tail(rest) if part == "0" else (rest, "")
                target = None if tail is None else (f"{where}.{'conv' if part == '0' else 'bn'}.{tail[0]}", tail[1])
        elif match := re.fullmatch(r"features\.(\d+)\.conv\.(\d+)\.(.+)", key):
            index, layer, rest = int(match.group(1)), int(match.group(2)), match.group(3)
            expanded = f"features.{index}.conv.3.weight" in state
            names = ["expand", "depthwise", "project.conv", "project.bn"] if expanded else \
                ["depthwise", "project.conv", "project.bn"]
            if 0 < index < last and layer < len(names):
                target = _mbv2_unit(f"blocks.{index - 1}.{names[layer]}", rest)
        elif match := re.fullmatch(r"classifier\.1\.(\w+)", key):
            target = (f"head.fc.{match.group(1)}", "")
        if target is not None:
            out[key] = target
    return out


def _mbv2_unit(prefix: str, rest: str) -> Renamed | None:
    """A MobileNetV2 unit: a ConvBNReLU (``0.*`` conv, ``1.*`` BatchNorm), a bare convolution or a BatchNorm."""
    if prefix.endswith(".bn"):
        return f"{prefix}.{rest}", ""
    if prefix.endswith(".conv"):
        tail = _conv_tail(rest)
        return None if tail is None else (f"{prefix}.{tail[0]}", tail[1])
    match = re.fullmatch(r"([01])\.(.+)", rest)
    if not match:
        return None
    if match.group(1) == "1":
        return f"{prefix}.bn.{match.group(2)}", ""
    tail = _conv_tail(match.group(2))
    return None if tail is None else (f"{prefix}.conv.{tail[0]}", tail[1])


def _mbv2_guess(state: Mapping[str, Tensor]) -> str:
    stem = state.get("features.0.0.weight")
    width = "?" if stem is None else f"{round(100 * stem.shape[0] / 32):03d}"
    experts = _experts(state, "features.1.conv.0.0.weight")
    if experts is None:
        return f"mobilenetv2_{width}"
    return f"od_mobilenetv2_{width} with kernel_num={experts}"


_TIMM_UNITS = {  # timm's EfficientNet block entries -> condconv's MBConv, by block kind (depthwise-separable or not)
    True: {"conv_dw": "depthwise.conv", "bn1": "depthwise.bn", "conv_pw": "project.conv", "bn2": "project.bn"},
    False: {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depthwise.conv", "bn2": "depthwise.bn",
            "conv_pwl": "project.conv", "bn3": "project.bn"},
}


def _timm_effnet_rename(state: Mapping[str, Tensor]) -> dict[str, Renamed]:
    stages = _counts(state, r"blocks\.(\d+)\.(\d+)\.")
    start, first = {}, 0
    for stage, count in stages.items():
        start[stage], first = first, first + count
    fixed = {"conv_stem.weight": "stem.conv.weight", "conv_head.weight": "head_conv.conv.weight",
             "classifier.weight": "head.fc.weight", "classifier.bias": "head.fc.bias"}
    out: dict[str, Renamed] = {}
    for key in state:
        target = None
        if key in fixed:
            target = (fixed[key], "")
        elif match := re.fullmatch(r"bn([12])\.(\w+)", key):
            target = (f"{'stem' if match.group(1) == '1' else 'head_conv'}.bn.{match.group(2)}", "")
        elif match := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key):
            prefix = f"blocks.{start[int(match.group(1))] + int(match.group(2))}"
            unit, rest = match.group(3), match.group(4)
            separable = f"blocks.{match.group(1)}.{match.group(2)}.conv_pwl.weight" not in state
            if unit in _TIMM_UNITS[separable]:
                target = (f"{prefix}.{_TIMM_UNITS[separable][unit]}.{rest}", "experts" if rest == "weight" else "")
            elif unit == "se" and (inner := re.fullmatch(r"conv_(reduce|expand)\.(\w+)", rest)):
                target = (f"{prefix}.se.{inner.group(1)}.{inner.group(2)}", "")
            elif unit == "routing_fn":
                target = (f"{prefix}.router.fc.{rest}", "")
        if target is not None:
            out[key] = target
    return out


def _timm_effnet_guess(state: Mapping[str, Tensor]) -> str:
    blocks = sum(_counts(state, r"blocks\.(\d+)\.(\d+)\.").values())
    variant = {16: "b0", 23: "b1"}.get(blocks, f"with {blocks} blocks")
    routing = next((v for k, v in state.items() if k.endswith("routing_fn.weight")), None)
    if routing is None:
        return f"efficientnet_{variant}"
    return f"(tf_)efficientnet_cc_{variant}_{routing.shape[0]}e"


def _identity_rename(state: Mapping[str, Tensor]) -> dict[str, Renamed]:
    return {key: (key, "") for key in state}


def _condconv_names(keys) -> bool:
    """condconv's own names: a ``stem.`` or ``head.`` module (no other source names its modules so), also when a
    few keys are missing or extra (then the error lists them by condconv's names)."""
    return any(k.startswith(("stem.", "head.")) for k in keys)


def _kw_guess(state: Mapping[str, Tensor]) -> str:
    cells = sum(k.startswith("warehouse.cells.") for k in state)
    return f"a KernelWarehouse model (kw_* preset, {cells} warehouse cell tensors)"


LAYOUTS: tuple[Layout, ...] = (
    Layout("kernelwarehouse", "the KernelWarehouse presets' names (the official model's, warehouse renamed)",
           lambda keys: any(k.startswith("warehouse.cells.") for k in keys), _identity_rename, _kw_guess),
    Layout("condconv", "condconv's names", _condconv_names, _identity_rename,
           lambda state: "a condconv model"),
    Layout("resnet", "torchvision-style ResNet names (conv1, layerN.M, fc)",
           lambda keys: "conv1.weight" in keys and "layer1.0.conv1.weight" in keys, _resnet_rename, _resnet_guess),
    Layout("mobilenet_v2", "torchvision-style MobileNetV2 names (features.N, classifier.1)",
           lambda keys: "features.0.0.weight" in keys and "features.1.conv.0.0.weight" in keys, _mbv2_rename,
           _mbv2_guess),
    Layout("timm_efficientnet", "timm EfficientNet names (conv_stem, blocks.S.B, conv_head, classifier)",
           lambda keys: "conv_stem.weight" in keys and "blocks.0.0.conv_dw.weight" in keys, _timm_effnet_rename,
           _timm_effnet_guess),
)


# ----------------------------------------------------------------------------------------------------------------
# reading and loading
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainedFile:
    """A weights file as recognised: its path, :class:`SourceFormat`, :class:`Layout` and tensors (source names)."""

    path: Path
    format: SourceFormat
    layout: Layout | None
    tensors: dict[str, Tensor]

    def describe(self) -> str:
        """What the file looks like, in words: ``'an official ODConv training checkpoint ... of od_resnet18 ...'``."""
        if self.layout is None:
            return f"{self.format.what}, with names of no known network (first keys {list(self.tensors)[:3]})"
        return f"{self.format.what}, {self.layout.what}, saved from {self.layout.guess(self.tensors)}"


def _read_raw(path: Path) -> _Raw:
    if path.is_dir():
        path = resolve_weights_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK") and head[:1] != b"\x80"):
        tensors, metadata = read_weights(path)
        return _Raw(path, tensors, metadata)
    # the official KernelWarehouse checkpoints hold their argparse.Namespace: read as a plain record, no code runs
    with torch.serialization.safe_globals([(kw_weights.TrainingArgs, "argparse.Namespace")]):
        return _Raw(path, _torch_load(path, "weights file"), None)


def read_pretrained(path: str | os.PathLike) -> PretrainedFile:
    """Read a weights file and recognise its format and naming (:data:`FORMATS`, :data:`LAYOUTS`).

    Args:
        path: a ``.pth`` / ``.pth.tar`` / ``.bin`` pickle (read with ``weights_only=True``), a ``.safetensors`` file,
            or a condconv run / checkpoint folder.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable file, or a format none of :data:`FORMATS` recognises (the message names the file).
    """
    raw = _read_raw(Path(path))
    for fmt in FORMATS:
        if fmt.detect(raw):
            tensors = fmt.tensors(raw)
            keys = set(tensors)
            layout = next((lay for lay in LAYOUTS if lay.detect(keys)), None)
            return PretrainedFile(raw.path, fmt, layout, tensors)
    kind = f"a {type(raw.obj).__name__}" + (f" with keys {sorted(raw.obj)[:6]}" if isinstance(raw.obj, dict) else "")
    raise ValueError(f"pretrained weights {raw.path}: unknown format ({kind}); known: "
                     f"{'; '.join(f.what for f in FORMATS)}")


def _first(items: list[str], count: int = 3) -> str:
    return "[" + ", ".join(items[:count]) + (f", ... {len(items) - count} more" if len(items) > count else "") + "]"


def _mapped(file: PretrainedFile, own: Mapping[str, Tensor], features_only: bool
            ) -> tuple[dict[str, Tensor], list[str], list[str], list[str]]:
    """The file's tensors in condconv names and shapes, and the missing / unexpected / mis-shaped keys."""
    renamed = file.layout.rename(file.tensors) if file.layout is not None else {}
    out: dict[str, Tensor] = {}
    unexpected, shapes, misfit = [], [], set()
    for key, tensor in file.tensors.items():
        target, reshape = renamed.get(key, (None, ""))
        if target is None or target not in own:
            if not (features_only and target is not None and target.startswith(("head.", "head_conv."))):
                unexpected.append(key)
            continue
        want = own[target].shape
        if tensor.shape != want and reshape and tensor.numel() == own[target].numel() and (
                reshape != "squeeze" or tensor.shape[2:] == (1, 1)) and (reshape != "experts" or (
                tensor.dim() == 2 and tensor.shape[0] == want[0])):
            tensor = tensor.reshape(want)
        if tensor.shape != want:
            shapes.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(want)}")
            misfit.add(target)
            continue
        out[target] = tensor
    missing = [k for k in own if k not in out and k not in misfit and not _NOT_STORED.search(k)]
    return out, missing, unexpected, shapes


def load_pretrained(model: nn.Module, path: str | os.PathLike | PretrainedFile, *, name: str | None = None
                    ) -> nn.Module:
    """Load a trained model's weights, from any file of :data:`FORMATS` named as any of :data:`LAYOUTS`, into
    ``model``, whole or not at all.

    Args:
        model: a zoo model built to the file's architecture (e.g. ``create_model('odconv_resnet18_4x')``); a
            ``features_only`` model takes the same file without its classifier.
        path: the file (see :func:`read_pretrained`), or a :class:`PretrainedFile` already read.
        name: the model's name, for messages. Default: its class name.

    Returns:
        ``model``, loaded (mode unchanged). Entries the sources do not store (the routers' temperature buffers)
        keep the model's values.

    Raises:
        ValueError: the file does not fit the model: one line naming the file, what it looks like (format, naming,
            the model it was saved from) and the first missing, unexpected and mis-shaped keys; nothing is loaded.
    """
    file = path if isinstance(path, PretrainedFile) else read_pretrained(path)
    target = unwrap(model)
    own = target.state_dict()
    tensors, missing, unexpected, shapes = _mapped(file, own, bool(getattr(target, "features_only", False)))
    if missing or unexpected or shapes or file.layout is None:
        parts = [f"missing {_first(missing)}" if missing else "", f"unexpected {_first(unexpected)}" if unexpected
                 else "", f"mis-shaped {_first(shapes, 2)}" if shapes else ""]
        label = name or type(target).__name__
        raise ValueError(f"pretrained weights {file.path} ({file.describe()}) do not fit {label}: "
                         f"{'; '.join(p for p in parts if p) or 'no key could be placed'}")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the published weights and how their sources evaluate them
# ----------------------------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EvalConfig:
    """A source's evaluation preprocessing: resize the shorter side to ``floor(image_size / crop_pct)`` with
    ``interpolation`` (Pillow's, as torchvision's ``Resize`` on images), center-crop ``image_size``, scale to [0, 1],
    normalise with ``mean``/``std`` (see :func:`condconv.data.preprocess.eval_transform`)."""

    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize(self) -> int:
        """The shorter side before the crop."""
        return math.floor(self.image_size / self.crop_pct)


#: OSVAI/ODConv ``main.py`` evaluates with ``Resize(256)``, ``CenterCrop(224)`` (torchvision, bilinear), ImageNet
#: mean/std
ODCONV_EVAL = EvalConfig()
#: timm's ``pretrained_cfg`` of ``tf_efficientnet_cc_*``: bicubic, crop 0.875 (B1: 240 px, 0.882), Inception mean/std
TIMM_TF_EVAL = EvalConfig(224, 0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD)


@dataclass(frozen=True)
class Published:
    """One published checkpoint: the condconv model that takes it, where it comes from, the source's figure.

    Attributes:
        model: the registered name. model_kwargs: its arguments (width of a static baseline).
        source: who published it. file: the downloaded file. top1: the source's ImageNet top-1 (percent).
        eval: the source's evaluation preprocessing.
        alias: the source's own name of the model, where condconv accepts it (timm's).
    """

    model: str
    model_kwargs: dict
    source: str
    file: str
    top1: float
    eval: EvalConfig
    alias: str | None = None


_TIMM = "timm (ported from the official TensorFlow EfficientNet-CondConv checkpoints)"
_OD = "OSVAI/ODConv README (Google Drive / Baidu 'model' links; a main.py checkpoint)"


def _timm(name: str, timm_name: str, top1: float, **eval_changes) -> Published:
    return Published(name, {}, _TIMM, f"{timm_name}.in1k: model.safetensors (Hugging Face timm/{timm_name}.in1k) "
                     f"or the .pth of its pretrained_cfg url", top1, replace(TIMM_TF_EVAL, **eval_changes), timm_name)


def _od(name: str, official: str, top1: float, **kwargs) -> Published:
    return Published(name, kwargs, _OD, f"{official} (.pth.tar)", top1, ODCONV_EVAL)


PUBLISHED: tuple[Published, ...] = (
    _timm("tf_condconv_efficientnet_b0_4e", "tf_efficientnet_cc_b0_4e", 77.324),
    _timm("tf_condconv_efficientnet_b0_8e", "tf_efficientnet_cc_b0_8e", 77.956),
    _timm("tf_condconv_efficientnet_b1_8e", "tf_efficientnet_cc_b1_8e", 79.318, image_size=240, crop_pct=0.882),
    _od("mobilenet_v2", "mobilenetv2_100", 71.65),
    _od("odconv_mobilenet_v2_100_1x", "od_mobilenetv2_100, kernel_num 1", 74.74),
    _od("odconv_mobilenet_v2_100_4x", "od_mobilenetv2_100, kernel_num 4", 75.29),
    _od("mobilenet_v2", "mobilenetv2_075", 69.18, width_mult=0.75),
    _od("odconv_mobilenet_v2_075_1x", "od_mobilenetv2_075, kernel_num 1", 72.71),
    _od("odconv_mobilenet_v2_075_4x", "od_mobilenetv2_075, kernel_num 4", 74.01),
    _od("mobilenet_v2", "mobilenetv2_050", 64.30, width_mult=0.5),
    _od("odconv_mobilenet_v2_050_1x", "od_mobilenetv2_050, kernel_num 1", 68.06),
    _od("odconv_mobilenet_v2_050_4x", "od_mobilenetv2_050, kernel_num 4", 70.23),
    _od("resnet18", "resnet18", 70.25),
    _od("odconv_resnet18_1x", "od_resnet18, kernel_num 1", 73.05),
    _od("odconv_resnet18_4x", "od_resnet18, kernel_num 4", 74.19),
    _od("resnet50", "resnet50", 76.23),
    _od("odconv_resnet50_1x", "od_resnet50, kernel_num 1", 77.87),
    _od("odconv_resnet50_4x", "od_resnet50, kernel_num 4", 78.50),
    _od("resnet101", "resnet101", 77.44),
    _od("odconv_resnet101_1x", "od_resnet101, kernel_num 1", 78.84),
    _od("odconv_resnet101_2x", "od_resnet101, kernel_num 2", 79.15),
)


def published(name: str) -> list[Published]:
    """The published checkpoints a registered model (or its source's name of it) takes."""
    return [row for row in PUBLISHED if name in (row.model, row.alias)]


def eval_config(name: str) -> EvalConfig:
    """The evaluation preprocessing of the published weights of ``name`` (a registered name or alias); models
    without published weights get the ImageNet default (224 px, crop 0.875, bilinear, ImageNet mean/std)."""
    rows = published(name)
    return rows[0].eval if rows else EvalConfig()
