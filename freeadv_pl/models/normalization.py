"""The input-normalization wrapper: data stay in [0, 1] pixel space, the model normalizes (docs/design.md, "Pixel
space")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InputNormalization(nn.Module):
    """Wraps a backbone so that it takes images in [0, 1] and normalizes them with per-channel mean and std.

    Keeping the normalization inside the model is what makes ε, step sizes and the clamp of x + δ to [0, 1]
    exact in pixel units. Mean and std are buffers: they follow the model's device and are saved with it.

    Args:
        backbone: the network that receives the normalized images.
        mean: per-channel means, or None for no normalization.
        std: per-channel standard deviations (all > 0), or None for no normalization.

    Raises:
        ValueError: if only one of mean/std is given, their lengths differ, or a std is not positive.

    Example:
        >>> net = InputNormalization(nn.Identity(), mean=[0.5], std=[0.25])
        >>> net(torch.full((1, 1, 2, 2), 0.75))[0, 0, 0, 0].item()
        1.0
    """

    def __init__(
        self, backbone: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.set_statistics(mean, std)

    def set_statistics(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        """Normalize with these per-channel statistics from now on (both None: no normalization); the buffers are made
        on the backbone's device. Raises ``ValueError`` as the constructor does."""
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must be given together (or both None), got mean={mean}, std={std}")
        if mean is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std must have one value per channel, got {list(mean)} and {list(std)}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"every std must be > 0, got {list(std)}")
        device = next((p.device for p in self.backbone.parameters()), None)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1).to(device))
        self.register_buffer("std", std_t.view(1, -1, 1, 1).to(device))

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.backbone(x)
