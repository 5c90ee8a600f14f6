"""The preprocessing of an image folder's images (PIL images to float tensors in [0, 1]): resize and center-crop for
evaluation, and the training augmentations of :class:`~freeadv_pl.ImageFolderDataModule`'s ``augment``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from freeadv_pl.data.base import Transform


def folder_eval_transform(image_size: int | None, resize_size: int | None) -> Transform:
    """Resize the shorter side to ``resize_size`` and center-crop to ``image_size`` (nothing when ``image_size`` is
    None), then to a float tensor in [0, 1]."""
    return v2.Compose([*_resize_and_crop(image_size, resize_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def folder_train_transform(
    augment: str, size: Sequence[int], image_size: int | None, resize_size: int | None
) -> Transform:
    """The training preprocessing of ``augment`` for images given to the model at ``size`` (height, width):
    ``"crop_flip"`` (the evaluation preprocessing, then a padded random crop and a horizontal flip),
    ``"resized_crop_flip"`` (RandomResizedCrop and a flip) or ``"none"`` (the evaluation preprocessing)."""
    if augment == "resized_crop_flip":
        return v2.Compose(
            [
                v2.RandomResizedCrop(list(size)),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
    if augment == "none":
        return folder_eval_transform(image_size, resize_size)
    return v2.Compose(
        [
            *_resize_and_crop(image_size, resize_size),
            v2.ToImage(),
            v2.RandomCrop(list(size), padding=crop_padding(size)),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def crop_padding(size: Sequence[int]) -> int:
    """``"crop_flip"``'s zero-padding: an eighth of the shorter side of ``size``, at least 1 (4 for 32×32, CIFAR's)."""
    return max(1, min(size) // 8)


def _resize_and_crop(image_size: int | None, resize_size: int | None) -> list[Transform]:
    if image_size is None:
        return []
    return [v2.Resize(resize_size), v2.CenterCrop(image_size)]
