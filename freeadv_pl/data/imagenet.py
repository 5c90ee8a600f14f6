"""ImageNet (ILSVRC 2012) from an ImageFolder tree: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from freeadv_pl._checks import check_int
from freeadv_pl.data.image_folder import ImageFolderDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_FIXED = {
    name: inspect.signature(ImageFolderDataModule.__init__).parameters[name].default
    for name in ("channels", "mean", "std", "test_split", "test_fraction", "stats_samples")
}
"""ImageFolderDataModule's arguments that ImageNet sets itself, with their defaults."""


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet from an ImageFolder tree, with the preprocessing of the official Free (PyTorch) code: an
    :class:`~freeadv_pl.data.image_folder.ImageFolderDataModule` with ImageNet's constants.

    ``data_dir`` holds ``train/`` and ``val/``, each with one folder per class (e.g. ``n01440764/``) of images.
    The layout is checked in ``setup`` before any image is read: missing splits, loose images in a split, class
    folders that differ between the splits, empty classes and a class count other than ``num_classes`` are each
    reported with the fix. Training images: RandomResizedCrop to ``image_size`` + horizontal flip; validation and
    test images: Resize to ``resize_size`` + CenterCrop to ``image_size``. Images reach the model in [0, 1]; the
    ImageNet ``mean``/``std`` are exposed for the model's input normalization. ``val/`` is the test split:
    ``val_size=0`` (the default here) validates on it, as the paper reports.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        num_classes: the number of class folders expected (1000 for ILSVRC 2012; fewer for a subset).
        image_size: side of the square crops given to the model.
        resize_size: side the shorter edge of an evaluation image is resized to before the center crop.
        augment: augment the training images (otherwise they are prepared as the evaluation images).
        val_size: training images held out for validation (0: validate on ``val/``).
        **kwargs: the other arguments of :class:`~freeadv_pl.data.image_folder.ImageFolderDataModule` and
            :class:`~freeadv_pl.data.base.VisionDataModule`.

    Raises:
        ValueError: if ``image_size`` > ``resize_size`` or a size < 1, with ``return_index`` and ``augment``, or given
            an argument it fixes (``channels``, ``mean``, ``std``, ``test_split``, ``test_fraction``,
            ``stats_samples``); in ``setup``, on a bad layout (see :func:`~freeadv_pl.data.image_folder.check_image_folder_layout`).
        FileNotFoundError: in ``setup``, if ``data_dir`` or a split folder does not exist.

    Example:
        >>> data = ImageNetDataModule("/datasets/imagenet", batch_size=256, batch_size_is_global=True)
        >>> data.num_classes, data.image_shape
        (1000, (3, 224, 224))
    """

    _dataset = "ImageNet"
    _loose_images_hint = (
        "For ILSVRC 2012's flat val/ folder, move each image into val/<wnid>/ using the validation ground-truth "
        "labels (e.g. the widely used valprep.sh script)."
    )

    def __init__(
        self,
        data_dir: str | Path,
        num_classes: int = 1000,
        image_size: int = 224,
        resize_size: int = 256,
        augment: bool = True,
        val_size: int = 0,
        **kwargs: Any,
    ) -> None:
        # The command line passes the parent's defaults; any other value would be silently replaced.
        fixed = sorted(name for name, default in _FIXED.items() if kwargs.pop(name, default) != default)
        if fixed:
            raise ValueError(
                f"ImageNetDataModule fixes {', '.join(fixed)} (3 channels, ImageNet's mean and std, val/ as the test "
                "split): leave them out, or use ImageFolderDataModule for other settings."
            )
        if augment and kwargs.get("return_index"):
            raise ValueError(
                "return_index=True with augment=True is not supported for ImageNet: a per-image perturbation needs "
                "one fixed frame per image, and RandomResizedCrop has no inverse. Set augment=False, or keep "
                "return_index=False (FreeAdversarialModule's delta_memory='batch')."
            )
        super().__init__(
            data_dir,
            image_size=check_int(image_size, "image_size", minimum=1),
            resize_size=check_int(resize_size, "resize_size", minimum=1),
            channels=3,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_classes=check_int(num_classes, "num_classes", minimum=2),
            test_split="val",
            augment="resized_crop_flip" if augment else "none",
            val_size=val_size,
            **kwargs,
        )
