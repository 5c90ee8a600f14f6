"""Random crop and horizontal flip of a whole batch on its device, invertible for perturbations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from freeadv_pl._checks import check_int


class CropFlip:
    """One batch's crops and flips: example b is zero-padded by ``padding``, cropped at ``rows[b]``/``cols[b]`` (the
    padded image's row and column of each output pixel; a flipped example's columns run backwards).

    :meth:`apply` maps images (or a perturbation) from the stored frame into the augmented one, :meth:`invert` maps
    an augmented perturbation back. A pixel of the stored frame that the crop left out keeps its old value, so
    ``crop_flip.invert(crop_flip.apply(delta), delta)`` is ``delta`` exactly.
    """

    def __init__(self, rows: Tensor, cols: Tensor, padding: int) -> None:
        self.rows, self.cols, self.padding = rows, cols, padding

    def apply(self, images: Tensor) -> Tensor:
        """``images`` (B×C×H×W, the stored frame) as the augmented batch (B×C×H×W)."""
        padded = F.pad(images, [self.padding] * 4).permute(0, 2, 3, 1)  # B×H'×W'×C
        batch = torch.arange(images.shape[0], device=images.device).view(-1, 1, 1)
        return padded[batch, self.rows.unsqueeze(2), self.cols.unsqueeze(1)].permute(0, 3, 1, 2)

    def invert(self, augmented: Tensor, stored: Tensor) -> Tensor:
        """``stored`` (the stored frame) with the pixels that the crop kept replaced by ``augmented``'s."""
        p = self.padding
        canvas = F.pad(stored, [p] * 4)  # a new tensor: ``stored`` is not written
        batch = torch.arange(stored.shape[0], device=stored.device).view(-1, 1, 1)
        canvas.permute(0, 2, 3, 1)[batch, self.rows.unsqueeze(2), self.cols.unsqueeze(1)] = augmented.permute(
            0, 2, 3, 1
        )
        return canvas[:, :, p : p + stored.shape[2], p : p + stored.shape[3]]


class RandomCropFlip:
    """The standard CIFAR augmentation for a batch on its device: zero-pad ``padding`` pixels, take a random crop of
    the original size, flip it horizontally with probability 1/2 (what ``v2.RandomCrop(32, padding=4)`` and
    ``v2.RandomHorizontalFlip()`` do to one image), each example drawn independently.

    The offsets and flips are drawn on the CPU from ``generator`` (None: torch's global generator), so a seeded
    generator gives the same augmentation on any device.

    Args:
        padding: zero padding on each side, the largest shift (≥ 0).
        flip: flip horizontally with probability 1/2.
        generator: a CPU ``torch.Generator`` for the draws, or None.

    Example:
        >>> augment = RandomCropFlip(padding=4, generator=torch.Generator().manual_seed(0))
        >>> crop_flip = augment.draw(torch.zeros(2, 3, 32, 32))
        >>> crop_flip.apply(torch.ones(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> None:
        self.padding = check_int(padding, "padding", minimum=0)
        self.flip = flip
        self.generator = generator

    def draw(self, images: Tensor) -> CropFlip:
        """Crops and flips for the batch ``images`` (B×C×H×W), on its device."""
        batch, height, width = images.shape[0], images.shape[2], images.shape[3]
        offsets = torch.randint(0, 2 * self.padding + 1, (2, batch, 1), generator=self.generator)
        flipped = torch.rand(batch, 1, generator=self.generator) < 0.5
        if not self.flip:
            flipped = torch.zeros_like(flipped)
        columns = torch.arange(width)
        rows = offsets[0] + torch.arange(height)
        cols = offsets[1] + torch.where(flipped, width - 1 - columns, columns)
        return CropFlip(rows.to(images.device), cols.to(images.device), self.padding)
