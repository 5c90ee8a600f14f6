"""What a training batch holds: ``(x, y)``, or ``(x, y, index)`` and ``(x, y, index, crop_flip)`` with
``VisionDataModule(return_index=True)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor

from freeadv_pl.data.augmentation import CropFlip


class TrainingBatch(NamedTuple):
    x: Tensor
    y: Tensor
    index: Tensor | None
    crop_flip: CropFlip | None


def unpack_batch(batch: Sequence[Any]) -> TrainingBatch:
    """The images, labels, dataset positions (or None) and on-device crop and flip (or None) of a batch.

    Raises:
        ValueError: if ``batch`` is not a sequence of 2 to 4 items.

    Example:
        >>> import torch
        >>> unpack_batch((torch.zeros(2, 1, 4, 4), torch.zeros(2))).index is None
        True
    """
    if not isinstance(batch, (list, tuple)) or not 2 <= len(batch) <= 4:
        kind = f"a sequence of {len(batch)} items" if isinstance(batch, (list, tuple)) else type(batch).__name__
        raise ValueError(
            f"a training batch must be (x, y), (x, y, index) or (x, y, index, crop_flip), got {kind}: make the "
            "dataset's examples (image, label) or (image, label, index)."
        )
    x, y, index, crop_flip = (*batch, None, None)[:4]
    return TrainingBatch(x, y, index, crop_flip)
