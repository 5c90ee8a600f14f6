"""A small CNN for 28×28 grey images (Fashion-MNIST), fast enough to adversarially train on a laptop CPU."""

from __future__ import annotations

from torch import Tensor, nn

from freeadv_pl._checks import check_int


class SmallCNN(nn.Module):
    """Two 3×3 conv + ReLU + max-pool stages (``width``, ``2·width`` channels) and a two-layer classifier head.

    The default (width 16, hidden 128) has about 0.2M parameters and trains at several thousand images per second
    on two CPU cores. It takes inputs whose height and width are multiples of 4 (28×28 by default).

    Args:
        in_channels: channels of the input images (1 for Fashion-MNIST).
        num_classes: number of output logits.
        width: channels of the first conv stage; the second has twice as many.
        hidden: units of the hidden fully connected layer.
        image_size: height (= width) of the input images.

    Example:
        >>> import torch
        >>> SmallCNN()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 128, image_size: int = 28
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width), ("hidden", hidden)):
            check_int(value, name, minimum=1)
        check_int(num_classes, "num_classes", minimum=2)
        if check_int(image_size, "image_size", minimum=4) % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2×2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
