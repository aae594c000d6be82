"""ConvNeXt-Tiny, static and with KernelWarehouse, in the layouts of the official KernelWarehouse code.

Liu et al., "A ConvNet for the 2020s", CVPR 2022, arXiv:2201.03545; KernelWarehouse: Li and Yao, ICML 2024,
arXiv:2406.07879 (``models/convnext.py``, ``models/kw_convnext.py``, ``configs/convnext/*.json``). Module names follow
those files so that their checkpoints load (:mod:`condconv.models.kernelwarehouse_weights`):

- ``convnext_tiny``: stem ``4x4/4`` convolution + LayerNorm, stages of 3, 3, 9, 3 blocks (96, 192, 384, 768 channels;
  depthwise 7x7, LayerNorm, ``Linear`` 4x expansion, GELU, ``Linear``, layer scale ``gamma``, stochastic depth rising
  linearly to ``drop_path_rate``), LayerNorm + 2x2/2 convolution between stages, LayerNorm and ``head``;
- ``kw_convnext_tiny_1x``: every convolution (stem, downsampling, depthwise, the two pointwise ones, as 1x1
  convolutions with bias) a KernelWarehouse layer; warehouses per stage and kind (the two pointwise convolutions of a
  stage share one), the attention normalised by LayerNorm (the official ``norm_layer=nn.LayerNorm``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from condconv.models.blocks import DropPath
from condconv.nn.kernel_warehouse import KernelWarehouse, KWConv2d

__all__ = ["ConvNeXt", "ChannelsFirstLayerNorm"]


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of ``(B, C, H, W)`` (parameters ``weight``, ``bias``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class _Block(nn.Module):
    def __init__(self, dim: int, drop_path: float, layer_scale: float, wh: KernelWarehouse | None, stage: int,
                 layer: int) -> None:
        super().__init__()
        self.kw = wh is not None
        if self.kw:
            name = f"stage{stage}_layer{layer}"
            self.dwconv = KWConv2d(dim, dim, 7, 1, 3, 1, dim, True, warehouse=wh, name=f"{name}_dwconv0")
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.pwconv1 = KWConv2d(dim, 4 * dim, 1, warehouse=wh, name=f"{name}_pwconv1")
            self.pwconv2 = KWConv2d(4 * dim, dim, 1, warehouse=wh, name=f"{name}_pwconv2")
            shape = (1, dim, 1, 1)
        else:
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.pwconv1 = nn.Linear(dim, 4 * dim)
            self.pwconv2 = nn.Linear(4 * dim, dim)
            shape = (dim,)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(layer_scale * torch.ones(shape)) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        if self.kw:
            y = self.pwconv2(self.act(self.pwconv1(y.permute(0, 3, 1, 2))))
            y = y if self.gamma is None else self.gamma * y
        else:
            y = self.pwconv2(self.act(self.pwconv1(y)))
            y = (y if self.gamma is None else self.gamma * y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvNeXt(nn.Module):
    """ConvNeXt, static or with KernelWarehouse convolutions (see the module docstring).

    Args:
        depths: blocks per stage. Default (3, 3, 9, 3). dims: channels per stage. Default (96, 192, 384, 768).
        num_classes: Default 1000. in_chans: Default 3. drop_path_rate: Default 0.0.
        layer_scale_init_value: Default 1e-6. kernelwarehouse: KernelWarehouse convolutions. Default False.
        **warehouse: :class:`~condconv.nn.kernel_warehouse.KernelWarehouse` options (``kernelwarehouse=True``;
            defaults: ``sharing_range=('layer', 'pwconv')``, ``norm='layer'``).
    """

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), *, num_classes: int = 1000, in_chans: int = 3,
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6, kernelwarehouse: bool = False,
                 **warehouse) -> None:
        super().__init__()
        wh = None
        if kernelwarehouse:
            warehouse.setdefault("sharing_range", ("layer", "pwconv"))
            warehouse.setdefault("norm", "layer")
            self.warehouse = wh = KernelWarehouse(**warehouse)
        elif warehouse:
            raise TypeError(f"warehouse options {sorted(warehouse)} need kernelwarehouse=True")

        def conv(cin, cout, k, name):
            if wh is None:
                return nn.Conv2d(cin, cout, k, k)
            return KWConv2d(cin, cout, k, k, warehouse=wh, name=name)

        self.downsample_layers = nn.ModuleList([nn.Sequential(conv(in_chans, dims[0], 4, "stagestem_conv0"),
                                                              ChannelsFirstLayerNorm(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(ChannelsFirstLayerNorm(dims[i]),
                                                        conv(dims[i], dims[i + 1], 2, f"stage{i}_layerds_conv0")))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[_Block(dims[i], rates[start + j], layer_scale_init_value, wh, i, j)
                                               for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if wh is not None:
            wh.build(self)

    def forward(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))
