"""Reference definitions for the ResNet variants torchvision does not ship.

torchvision's `models.resnet` is the reference for the ImageNet family with its default shortcut
(option B: a 1x1 projection where the shape changes). This file adds, with torchvision's attribute
names so the state_dict keys line up:

* shortcut option A (parameter-free: subsample by the stride, zero-pad the new channels, split evenly
  before and after the existing ones) and option C (a projection on every block), ResNet paper §3.3;
* "plain" networks: the same layers with the shortcut removed (paper §4.1, plain-18/34);
* the CIFAR networks of paper §4.2: 6n+2 layers, 16/32/64 filters, 3x3 stem, no max-pool.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3


class PadShortcut(nn.Module):
    """Option A: x[:, :, ::s, ::s] with zero channels padded to `out_channels` (half before, half
    after). No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.front = (out_channels - in_channels) // 2
        self.back = out_channels - in_channels - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.front, self.back))


def make_shortcut(
    shortcut: str, plain: bool, inplanes: int, outplanes: int, stride: int, norm_layer
) -> Optional[nn.Module]:
    """The `downsample` of a block: None where the identity is used (or for plain nets)."""
    if plain:
        return None
    changes = stride != 1 or inplanes != outplanes
    if shortcut == "C" or (shortcut == "B" and changes):
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))
    if shortcut == "A" and changes:
        return PadShortcut(inplanes, outplanes, stride)
    return None


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=nn.BatchNorm2d, plain=False):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.plain = plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.plain:
            if self.downsample is not None:
                identity = self.downsample(x)
            out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=nn.BatchNorm2d, plain=False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.plain = plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if not self.plain:
            if self.downsample is not None:
                identity = self.downsample(x)
            out = out + identity
        return self.relu(out)


def init_like_torchvision(model: nn.Module, zero_init_residual: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(nn.Module):
    """torchvision's ResNet with `shortcut` in {"A", "B", "C"} and `plain`."""

    def __init__(self, block, layers: List[int], num_classes=1000, shortcut="B", plain=False,
                 groups=1, width_per_group=64, in_channels=3, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.shortcut = shortcut
        self.plain = plain
        self.norm_layer = norm_layer
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_like_torchvision(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        out = planes * block.expansion
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            down = make_shortcut(self.shortcut, self.plain, self.inplanes, out, s, self.norm_layer)
            layers.append(block(self.inplanes, planes, s, down, self.groups, self.base_width, 1,
                                self.norm_layer, self.plain))
            self.inplanes = out
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """ResNet paper §4.2: 3x3 stem to 16 channels, three stages of n BasicBlocks (16, 32, 64
    filters; stride 2 at the start of stages 2 and 3), global average pool, `fc`."""

    def __init__(self, depth: int, num_classes=10, shortcut="A", plain=False, in_channels=3):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.inplanes = 16
        self.shortcut = shortcut
        self.plain = plain
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_like_torchvision(self)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            down = make_shortcut(self.shortcut, self.plain, self.inplanes, planes, s, nn.BatchNorm2d)
            layers.append(BasicBlock(self.inplanes, planes, s, down, plain=self.plain))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
