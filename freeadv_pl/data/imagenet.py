"""ImageNet (ILSVRC 2012) from an ImageFolder tree: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from freeadv_pl._checks import check_int
from freeadv_pl.data.base import Transform, VisionDataModule

_SPLITS = {True: "train", False: "val"}


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_split(root: Path, split: str) -> list[str]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"ImageNet split folder {split_dir} does not exist: data_dir must hold train/ and val/, each with one "
            "folder per class (the ImageFolder layout)"
        )
    classes = _class_folders(split_dir)
    loose_images = _has_image(split_dir)
    if not classes or loose_images:
        raise ValueError(
            f"{split_dir} must hold one folder per class with the images inside, but it holds "
            f"{'images directly' if loose_images else 'no class folders'}. For ILSVRC 2012's flat val/ folder, move "
            "each image into val/<wnid>/ using the validation ground-truth labels (e.g. the widely used valprep.sh "
            "script)."
        )
    empty = [name for name in classes if not _has_image(split_dir / name)]
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) of {split_dir} hold no image ({', '.join(IMG_EXTENSIONS[:3])}, ...): "
            f"{_listing(empty)}. Restore their images or remove the class from every split."
        )
    return classes


def check_image_folder_layout(root: Path, splits: tuple[str, ...], num_classes: int) -> list[str]:
    """Check ``root/<split>/<class>/<image>`` for each split and return the class names (sorted, as ImageFolder).

    Every split must exist, hold one folder per class and no loose images, have the same class folders as the
    other splits, and every class folder at least one image.

    Raises:
        FileNotFoundError: if ``root`` or a split is missing.
        ValueError: on loose images in a split, class folders that differ between splits, an empty class
            folder, or a number of classes other than ``num_classes``; the message says what to do.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"ImageNet folder {root} does not exist: set data_dir to the folder that holds train/ and val/"
        )
    found = {split: _check_split(root, split) for split in splits}
    classes = found[splits[0]]
    for split in splits[1:]:
        only_here = sorted(set(found[split]) - set(classes))
        missing = sorted(set(classes) - set(found[split]))
        if only_here or missing:
            problems = [f"only in {split}/: {_listing(only_here)}"] if only_here else []
            problems += [f"missing from {split}/: {_listing(missing)}"] if missing else []
            raise ValueError(
                f"the class folders of {root / split} do not match those of {root / splits[0]}: "
                f"{'; '.join(problems)}. Both splits need the same class folders, or a label would not mean the "
                "same class in both."
            )
    if len(classes) != num_classes:
        raise ValueError(
            f"{root} has {len(classes)} classes but num_classes={num_classes}: set data.init_args.num_classes to "
            f"{len(classes)} (and the backbone's num_classes with it)."
        )
    return classes


class ImageNetDataModule(VisionDataModule):
    """ImageNet from an ImageFolder tree, with the preprocessing of the official Free (PyTorch) code.

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
        **kwargs: the other arguments of :class:`~freeadv_pl.data.base.VisionDataModule`.

    Raises:
        ValueError: if ``image_size`` > ``resize_size`` or a size < 1, or with ``return_index`` and ``augment``; in
            ``setup``, on a bad layout (see :func:`check_image_folder_layout`).
        FileNotFoundError: in ``setup``, if ``data_dir`` or a split folder does not exist.

    Example:
        >>> data = ImageNetDataModule("/datasets/imagenet", batch_size=256, batch_size_is_global=True)
        >>> data.num_classes, data.image_shape
        (1000, (3, 224, 224))
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

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
        super().__init__(data_dir, val_size=val_size, **kwargs)
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.image_size = check_int(image_size, "image_size", minimum=1)
        self.resize_size = check_int(resize_size, "resize_size", minimum=1)
        if image_size > resize_size:
            raise ValueError(
                f"image_size={image_size} must not exceed resize_size={resize_size}: evaluation images are resized "
                "to resize_size, then center-cropped to image_size (the usual ratio is 224/256)"
            )
        if augment and self.return_index:
            raise ValueError(
                "return_index=True with augment=True is not supported for ImageNet: a per-image perturbation needs "
                "one fixed frame per image, and RandomResizedCrop has no inverse. Set augment=False, or keep "
                "return_index=False (FreeAdversarialModule's delta_memory='batch')."
            )
        self.augment = augment
        self.image_shape = (3, image_size, image_size)
        self.classes: list[str] | None = None

    def setup(self, stage: str) -> None:
        needs_train = stage in ("fit", "validate")
        needs_val = stage in ("test", "predict") or (needs_train and self.val_size == 0)
        splits = tuple(_SPLITS[train] for train, needed in ((True, needs_train), (False, needs_val)) if needed)
        self.classes = check_image_folder_layout(self.data_dir, splits, self.num_classes)
        super().setup(stage)

    def load_split(self, train: bool) -> Dataset:
        # No transform here: the base applies train_transform or eval_transform per subset.
        return ImageFolder(str(self.data_dir / _SPLITS[train]))

    def train_transform(self) -> Transform:
        if not self.augment:
            return self.eval_transform()
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size),
                v2.RandomHorizontalFlip(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def eval_transform(self) -> Transform:
        return v2.Compose(
            [
                v2.Resize(self.resize_size),
                v2.CenterCrop(self.image_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )
