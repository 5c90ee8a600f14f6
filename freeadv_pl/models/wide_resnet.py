"""Wide residual networks (Zagoruyko & Komodakis 2016), including the variant Madry et al. and the Free paper train.

Two styles of the same pre-activation network of three stages (widths 16k, 32k, 64k):

* ``"zagoruyko"`` — the common PyTorch WRN (as in TRADES): ReLU, 1×1 convolution shortcuts where the shape
  changes, depth = 6n + 4 with n residual units per stage (WRN-28-10, WRN-34-10).
* ``"madry"`` — the network of Madry et al.'s ``cifar10_challenge`` that the Free paper calls WRN-32-10: leaky
  ReLU (slope 0.1), parameter-free shortcuts (average pooling + zero-padded channels), the shortcut of the first
  unit taken after its activation only in the first stage, depth = 6n + 2 (n = 5 for WRN-32-10).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from freeadv_pl._checks import check_choice, check_int


class _Unit(nn.Module):
    """A pre-activation residual unit: BN-act-conv3×3(stride)-BN-act-conv3×3 plus a shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        slope: float,
        projection: bool,
        activate_shortcut: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.slope = slope
        self.dropout = dropout
        self.stride = stride
        self.pad = out_channels - in_channels
        self.activate_shortcut = activate_shortcut
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False) if projection and changes_shape else None
        )

    def _act(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope) if self.slope else F.relu(x)

    def forward(self, x: Tensor) -> Tensor:
        activated = self._act(self.bn1(x))
        shortcut = activated if self.activate_shortcut else x
        out = self.conv1(activated)
        out = self._act(self.bn2(out))
        if self.dropout:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        else:
            if self.stride != 1:
                shortcut = F.avg_pool2d(shortcut, self.stride)
            if self.pad:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32×32 images (any size works: the head pools globally).

    Args:
        depth: number of layers: 6n + 4 in the ``"zagoruyko"`` style (28, 34, ...), 6n + 2 in the ``"madry"``
            style (32 for the paper's WRN-32-10).
        widen_factor: k, the width multiplier (10 in the paper).
        num_classes: number of logits.
        in_channels: image channels.
        style: ``"zagoruyko"`` or ``"madry"`` (see the module docstring).
        dropout: dropout probability between the two convolutions of each unit (0 in the paper).

    Raises:
        ValueError: if ``depth`` does not fit the style's formula, on an unknown style, or a size < 1.

    Example:
        >>> import torch
        >>> net = WideResNet(depth=10, widen_factor=1)
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        style: Literal["zagoruyko", "madry"] = "zagoruyko",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice(style, "style", ("zagoruyko", "madry"))
        check_int(depth, "depth", minimum=1)
        check_int(widen_factor, "widen_factor", minimum=1)
        check_int(num_classes, "num_classes", minimum=1)
        extra = 4 if style == "zagoruyko" else 2
        if depth < 6 + extra or (depth - extra) % 6:
            raise ValueError(
                f"depth must be 6n + {extra} (n ≥ 1 residual units per stage) in the {style!r} style, got {depth}: "
                + ("e.g. 28 or 34" if style == "zagoruyko" else "e.g. 32 for the paper's WRN-32-10")
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        units = (depth - extra) // 6
        madry = style == "madry"
        slope = 0.1 if madry else 0.0
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers = []
        for stage, stride in enumerate((1, 2, 2)):
            for index in range(units):
                first = index == 0
                in_width = widths[stage] if first else widths[stage + 1]
                changes_shape = first and (stride != 1 or in_width != widths[stage + 1])
                layers.append(
                    _Unit(
                        in_width,
                        widths[stage + 1],
                        stride if first else 1,
                        slope,
                        projection=not madry,
                        # Madry: activate_before_residual = [True, False, False]; Zagoruyko: whenever the shape changes.
                        activate_shortcut=(first and stage == 0) if madry else changes_shape,
                        dropout=dropout,
                    )
                )
        self.units = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3])
        self.slope = slope
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.units(self.stem(x))
        out = self.bn(out)
        out = F.leaky_relu(out, self.slope) if self.slope else F.relu(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
