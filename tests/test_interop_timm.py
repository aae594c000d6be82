"""Against the real sources: timm's CondConv EfficientNets (Yang et al., "CondConv", NeurIPS 2019, arXiv:1904.04971)
load by name and give timm's outputs; each published model's evaluation preprocessing equals its source's (timm's
``resolve_data_config`` + ``create_transform``; torchvision's transforms as the official ODConv ``main.py`` builds
them); torchvision's Faster R-CNN trains and runs on an ODConv ResNet-50 backbone (Li, Zhou, Yao, ICLR 2022,
arXiv:2209.07947) loaded from an official-layout checkpoint.

timm imports torchvision, whose wheels are built against torch's CUDA build (with the ``+cpu`` torch,
``import torchvision`` fails: "operator torchvision::nms does not exist"): CI runs this file, ``-m interop``, in a
second virtual environment with the CUDA-build torch, torchvision and timm (``.ci/run``). Elsewhere it is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm (with torchvision, on torch's CUDA build) is not installed: see "
                           ".ci/run for the interop environment", exc_type=ImportError)
torchvision = pytest.importorskip("torchvision", exc_type=ImportError)

from condconv.models import create_model  # noqa: E402
from condconv.models.pretrained import PUBLISHED, eval_config  # noqa: E402

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("one_thread")]

TIMM_MODELS = {  # timm name -> input side of the test (odd sides exercise TensorFlow 'SAME' padding's asymmetry)
    "tf_efficientnet_cc_b0_4e": 65,
    "tf_efficientnet_cc_b0_8e": 64,
    "tf_efficientnet_cc_b1_8e": 67,
    "efficientnet_cc_b0_4e": 64,
    "efficientnet_cc_b0_8e": 65,
    "efficientnet_cc_b1_8e": 66,
}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, scaled per tensor so activations stay moderate."""
    gen = torch.Generator().manual_seed(seed)
    expert_fan_in = {f"{n}.weight": math.prod(m.weight_shape[1:]) for n, m in model.named_modules()
                     if hasattr(m, "weight_shape")}  # timm's CondConv2d: experts flattened [E, out * in/g * kh * kw]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = expert_fan_in.get(name, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "bn" in name and "weight" in name else 0))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_condconv_efficientnet_loads_by_name_and_gives_timms_outputs(name, suffix, tmp_path):
    source = _randomise(timm.create_model(name)).eval()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    ours = create_model(name, pretrained=path).eval()
    side = TIMM_MODELS[name]
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want32, got32 = source(x), ours(x)
        want, got = source.double()(x.double()), ours.double()(x.double())
    scale = float(want.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got32, want32, rtol=1e-4, atol=1e-4 * scale)


def _images():
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for h, w in [(300, 400), (480, 333), (256, 256), (231, 517), (200, 180)]:
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        yield Image.fromarray(pixels.numpy())


def _ours(name: str, img) -> torch.Tensor:
    from condconv.data.preprocess import eval_transform

    cfg = eval_config(name)
    return eval_transform(img, image_size=cfg.image_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                          mean=cfg.mean, std=cfg.std)


@pytest.mark.parametrize("name", ["tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e"])
def test_preprocessing_equals_timms(name):
    from timm.data import create_transform, resolve_data_config

    source = timm.create_model(name, pretrained=False)
    transform = create_transform(**resolve_data_config({}, model=source))
    for img in _images():
        want = transform(img)
        torch.testing.assert_close(_ours(name, img), want, rtol=0, atol=1e-6)


def test_preprocessing_equals_the_official_odconv_main():
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    names = sorted({row.model for row in PUBLISHED if "ODConv" in row.source})
    assert len(names) == 16  # 12 ODConv presets and the baselines: mobilenet_v2 (3 widths), resnet18/50/101
    for img in _images():
        want = transform(img)
        for name in names:
            torch.testing.assert_close(_ours(name, img), want, rtol=0, atol=1e-6)


def test_faster_rcnn_on_an_odconv_resnet50_backbone_from_an_official_checkpoint(tmp_path):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    from test_pretrained import OfficialResNet, save_official
    from test_pretrained import _randomise as randomise_official

    path = tmp_path / "od_resnet50_4x.pth.tar"
    save_official(randomise_official(OfficialResNet((3, 4, 6, 3), True, 4)), path)
    trunk = create_model("odconv_resnet50_4x", features_only=True, out_indices=(1, 2, 3, 4), norm_eval=True,
                         pretrained=path)
    channels = [info.channels for info in trunk.feature_info]
    assert channels == [256, 512, 1024, 2048]
    backbone = BackboneWithFPN(trunk.levels(), {"level2": "0", "level3": "1", "level4": "2", "level5": "3"},
                               channels, out_channels=64)
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=160)
    images = [torch.rand(3, 128, 150), torch.rand(3, 140, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 80.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 60.0, 100.0], [30.0, 40.0, 120.0, 120.0]]),
                "labels": torch.tensor([2, 1])}]
    detector.train()
    bns = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)  # norm_eval: the routers' BatchNorm included
    stats = {id(m): m.running_mean.clone() for m in bns}
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(m.running_mean, stats[id(m)]) for m in bns)
    changed = [k for k, v in trunk.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("conv.weight") for k in changed)  # the backbone trained
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores"} for o in out)
