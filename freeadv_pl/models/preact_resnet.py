"""PreActResNet-18 (He et al. 2016, identity mappings), the usual baseline of fast adversarial training."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from freeadv_pl._checks import check_int


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3×3(stride)-BN-ReLU-conv3×3; a 1×1 convolution shortcut (on the activation) where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if changes_shape else None

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 for 32×32 images (the CIFAR layout: a 3×3 stem, no max pooling), 11.2M parameters.

    The network of Wong et al.'s "Fast is better than free" and most fast adversarial training work: four stages
    of two pre-activation blocks (64, 128, 256, 512 channels), a final BN-ReLU, global average pooling, a linear head.

    Args:
        num_classes: number of logits.
        in_channels: image channels.

    Example:
        >>> import torch
        >>> PreActResNet18(num_classes=100)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=1)
        check_int(in_channels, "in_channels", minimum=1)
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        blocks, width = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_PreActBlock(width, out_channels, stride), _PreActBlock(out_channels, out_channels, 1)]
            width = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
