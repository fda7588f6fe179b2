"""Res2Net-50 (26w x 4s), the paper's fundus backbone, defined here because timm cannot be
imported beside this torch (its torchvision import fails; see docs/method.md, "Backbones").

Parameter names follow the reference Res2Net release (``conv1``, ``bn1``, ``layerN.i.convs.j``,
``bns.j``, ``conv3``, ``downsample.0/1``), which timm's ``res2net50_26w_4s`` shares, so their
ImageNet checkpoints load into it (the ``fc`` head is not part of the backbone).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Bottle2neck(nn.Module):
    """A ResNet bottleneck whose 3x3 conv is split into ``scale`` groups of ``width`` channels.

    Each group after the first also receives the previous group's output, so one block mixes
    receptive fields of several sizes (the "multi-scale" in Res2Net). The first block of a stage
    ("stage" type) cannot chain groups across a stride change, so it convolves each group on its
    own and average-pools the untouched last group to the new resolution.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        base_width: int = 26,
        scale: int = 4,
        first: bool = False,
    ) -> None:
        super().__init__()
        width = math.floor(planes * base_width / 64.0)
        self.width, self.scale, self.first = width, scale, first
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        n_convs = scale - 1
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False) for _ in range(n_convs)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(n_convs))
        self.pool = nn.AvgPool2d(3, stride=stride, padding=1) if first else nn.Identity()
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        groups = torch.split(out, self.width, dim=1)
        outs = []
        sp = groups[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i > 0:
                sp = groups[i] if self.first else sp + groups[i]
            sp = self.relu(bn(conv(sp)))
            outs.append(sp)
        outs.append(self.pool(groups[-1]))
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        return self.relu(out + shortcut)


class Res2Net(nn.Module):
    """Res2Net trunk: 7x7 stem, four stages of :class:`Bottle2neck`, global average pool."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        base_width: int = 26,
        scale: int = 4,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            out_planes = planes * Bottle2neck.expansion
            downsample = None
            if stride != 1 or inplanes != out_planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_planes),
                )
            stage = [
                Bottle2neck(inplanes, planes, stride, downsample, base_width, scale, first=True)
            ]
            stage += [
                Bottle2neck(out_planes, planes, 1, None, base_width, scale)
                for _ in range(1, blocks)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = out_planes
        self.out_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def res2net50_26w_4s(in_chans: int = 3) -> Res2Net:
    return Res2Net((3, 4, 6, 3), base_width=26, scale=4, in_chans=in_chans)
