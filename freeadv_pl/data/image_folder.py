"""Any image classification data stored as class folders (torchvision's ImageFolder layout): ``train/<class>/<image>``
and, optionally, ``test/<class>/<image>`` or ``val/<class>/<image>`` as the test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl.data._folder_files import (
    ImageFiles,
    check_image_folder_layout,
    held_out_split,
    image_files,
)
from freeadv_pl.data._folder_transforms import crop_padding, folder_eval_transform, folder_train_transform
from freeadv_pl.data._image_sample import (
    channel_statistics,
    detected_channels,
    given_statistics,
    image_headers,
    sample_statistics,
    seeded_sample,
    stored_size,
)
from freeadv_pl.data.augmentation import RandomCropFlip
from freeadv_pl.data.base import Transform, VisionDataModule

__all__ = ["ImageFolderDataModule", "channel_statistics", "check_image_folder_layout"]

_TEST_FOLDERS = ("test", "val")
"""The folders looked for, in this order, as the test split when ``test_split`` is None."""
AUGMENTATIONS = ("crop_flip", "resized_crop_flip", "none")


class ImageFolderDataModule(VisionDataModule):
    """Your own images, one folder per class: ``data_dir/train/<class>/<image>`` (torchvision's ImageFolder layout).

    **Splits.** ``train/`` is required. The test split is the folder ``test_split`` (None: ``test/`` if it exists,
    else ``val/``); without one, ``test_fraction`` of the images of ``train/`` (seeded by ``seed``) are held out as
    the test split. Validation takes ``val_size`` images of the remaining training images, as every DataModule here
    (0, the default: validate on the test split). Labels are the indices of the sorted class folder names
    (``classes``); the images directly inside each class folder are read (any extension of torchvision's
    ``IMG_EXTENSIONS``; subfolders are not read). The layout is checked first (:func:`check_image_folder_layout`).

    **Images.** With ``image_size``, an evaluation image is resized (shorter side to ``resize_size``) and
    center-cropped to ``image_size``×``image_size``; with ``image_size=None`` images are used at their stored size,
    which must then be one size for all (checked on the headers of the sample below and of as many test images, and
    on each image as it is read). ``channels`` is 1 (grayscale) or 3 (RGB); None detects it from the sample: 1 if
    every sampled image is grayscale (PIL mode "L", "1", "I", ...), else 3; every image is converted to it. Training
    images are augmented by ``augment``: ``"crop_flip"`` (the evaluation preprocessing, then zero-padding by an eighth
    of the shorter side, a random crop back to the size and a horizontal flip: CIFAR's augmentation; with
    ``return_index`` the crop and flip run on the batch's device, for a per-image δ), ``"resized_crop_flip"``
    (RandomResizedCrop + flip, as ImageNet; not with ``return_index``) or ``"none"``. Images reach the model in
    [0, 1].

    **Statistics.** ``mean`` and ``std`` as given, or else computed from a seeded sample of ``stats_samples`` training
    images (``stats_files``; never a test image) through the evaluation preprocessing, and logged. The model
    normalizes with them.

    ``num_classes``, ``classes``, ``mean``, ``std`` and ``image_shape`` are read from the folders on first access
    (the command line reads them right after construction, to build the model), then kept.

    Args:
        data_dir: the folder holding ``train/`` (and the test split's folder, if any).
        image_size: side of the square images given to the model; None: the images' stored size.
        resize_size: side the shorter edge of an image is resized to before the center crop; None: ``image_size``.
        channels: 1 or 3; None: detected from the sample.
        mean: per-channel means for the model's input normalization; None: computed (with ``std``).
        std: per-channel standard deviations, given with ``mean``.
        stats_samples: training images read (a seeded sample) to compute ``mean``/``std`` and to detect the size and
            the channels.
        num_classes: the number of class folders expected; None: as many as there are.
        test_split: the folder of the test split; None: ``test/`` or ``val/`` where one exists, else a hold-out of
            ``train/``.
        test_fraction: the fraction of ``train/`` held out as the test split when there is no test folder.
        augment: the training augmentation, one of ``"crop_flip"``, ``"resized_crop_flip"``, ``"none"``.
        val_size: training images held out for validation (0: validate on the test split).
        **kwargs: the other arguments of :class:`~freeadv_pl.data.base.VisionDataModule`.

    Raises:
        ValueError: on a bad argument (``resize_size`` < ``image_size``, ``channels`` not 1 or 3, ``mean`` without
            ``std`` or of another length, ``test_fraction`` outside (0, 1), ``augment="resized_crop_flip"`` with
            ``return_index``, ...); on first access to the attributes above or in ``setup``: on a bad layout (see
            :func:`check_image_folder_layout`), images of different sizes with ``image_size=None``, ``mean`` of
            another length than the images' channels, a ``test_fraction`` that leaves no training image, or sampled
            images constant in a channel (a std of 0).
        FileNotFoundError: on first access or in ``setup``, if ``data_dir``, ``train/`` or ``test_split`` does not
            exist.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> for split in ("train", "test"):
        ...     for name in ("cat", "dog"):
        ...         (Path(folder.name) / split / name).mkdir(parents=True)
        ...         for shade in (0, 255):  # grayscale: one channel
        ...             Image.new("L", (24, 20), shade).save(Path(folder.name) / split / name / f"{shade}.png")
        >>> data = ImageFolderDataModule(folder.name, batch_size=4)
        >>> data.classes, data.num_classes, data.image_shape
        (['cat', 'dog'], 2, (1, 20, 24))
        >>> data.mean, data.std
        ((0.5,), (0.5,))
        >>> data.setup("fit")
        >>> len(data.train_set), len(data.test_set)
        (4, 4)
        >>> folder.cleanup()
    """

    _dataset = "image"
    _loose_images_hint = "Put each image in the folder of its class: <split>/<class>/<image>."

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int | None = None,
        resize_size: int | None = None,
        channels: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_samples: int = 1000,
        num_classes: int | None = None,
        test_split: str | None = None,
        test_fraction: float = 0.1,
        augment: Literal["crop_flip", "resized_crop_flip", "none"] = "crop_flip",
        val_size: int = 0,
        **kwargs: Any,
    ) -> None:
        self.augment = check_choice(augment, "augment", AUGMENTATIONS)  # before the base's batch_augmentation()
        self.image_size = None if image_size is None else check_int(image_size, "image_size", minimum=1)
        if data_dir is None:
            raise ValueError("data_dir must be the folder that holds train/ (one folder of images per class), got None")
        super().__init__(data_dir, val_size=val_size, **kwargs)
        if resize_size is not None and image_size is None:
            raise ValueError(
                f"resize_size={resize_size} needs an image_size: set image_size=... (the side of the center crop), "
                "or leave resize_size out to use the images at their stored size"
            )
        self.resize_size = image_size if resize_size is None else check_int(resize_size, "resize_size", minimum=1)
        if image_size is not None and image_size > self.resize_size:
            raise ValueError(
                f"image_size={image_size} must not exceed resize_size={resize_size}: evaluation images are resized "
                "to resize_size, then center-cropped to image_size (the usual ratio is 224/256)"
            )
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (detected), got {channels!r}")
        self._channels = channels
        self._mean, self._std = given_statistics(mean, std, channels)
        self.stats_samples = check_int(stats_samples, "stats_samples", minimum=1)
        self._num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=2)
        if test_split is not None and (not isinstance(test_split, str) or test_split in ("", "train")):
            raise ValueError(
                f"test_split must name the folder of the test split (e.g. 'val'), not {test_split!r}; None: "
                f"{' or '.join(_TEST_FOLDERS)} where one exists, else test_fraction of train/"
            )
        self.test_split = test_split
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"test_fraction must lie in (0, 1) (the share of train/ held out as the test split), got "
                f"{test_fraction!r}"
            )
        self.test_fraction = test_fraction
        if self.augment == "resized_crop_flip" and self.return_index:
            raise ValueError(
                "return_index=True with augment='resized_crop_flip' is not supported: a per-image perturbation needs "
                "one fixed frame per image, and RandomResizedCrop has no inverse. Set augment='crop_flip' (its crop "
                "and flip then run on the batch's device) or 'none', or keep return_index=False."
            )
        self._classes: list[str] | None = None
        self._samples: dict[str, list[tuple[str, int]]] = {}
        self._held_out: tuple[list[tuple[str, int]], list[tuple[str, int]]] | None = None
        self._stats_files: list[str] | None = None
        self._headers: list[tuple[str, tuple[int, int], str]] | None = None
        self._computed: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def classes(self) -> list[str]:
        """The class names: the sorted folder names of ``train/``."""
        if self._classes is None:
            self._classes = self._check_layout(["train"])
        return self._classes

    @property
    def num_classes(self) -> int:
        return self._num_classes if self._num_classes is not None else len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels = self._channels if self._channels is not None else self._detected_channels()
        if self.image_size is not None:
            return channels, self.image_size, self.image_size
        width, height = self._stored_size()
        return channels, height, width

    @property
    def mean(self) -> tuple[float, ...]:
        return self._mean if self._mean is not None else self._statistics()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._std if self._std is not None else self._statistics()[1]

    @property
    def stats_files(self) -> list[str]:
        """The seeded sample of training images (at most ``stats_samples``) read for the statistics, the size and the
        channels, in the order of ``train/``."""
        if self._stats_files is None:
            self._stats_files = seeded_sample(self._split_samples(train=True), self.stats_samples, self.seed)
        return self._stats_files

    def setup(self, stage: str) -> None:
        needs_train = stage in ("fit", "validate")
        needs_test = stage in ("test", "predict") or (needs_train and self.val_size == 0)
        folder = self._test_folder()
        splits = ["train"] if needs_train or (self.data_dir / "train").is_dir() or folder is None else []
        splits += [folder] if needs_test and folder is not None else []
        classes = self._check_layout(splits)
        self._classes = self._classes or classes
        if self._mean is not None and len(self._mean) != self.image_shape[0]:
            raise ValueError(
                f"mean and std have {len(self._mean)} values but the images have {self.image_shape[0]} channel(s): "
                f"give {self.image_shape[0]} of each, or set channels={len(self._mean)} to convert the images"
            )
        if self._batch_augmentation is not None:
            self._batch_augmentation.padding = crop_padding(self.image_shape[1:])
        super().setup(stage)

    def load_split(self, train: bool) -> Dataset:
        # No transform here: the base applies train_transform or eval_transform per subset.
        mode = "L" if self.image_shape[0] == 1 else "RGB"
        return ImageFiles(
            self._split_samples(train), mode, None if self.image_size is not None else self._stored_size()
        )

    def train_transform(self) -> Transform:
        if self.augment == "crop_flip" and self.return_index:  # the crop and flip run on the batch's device
            return self.eval_transform()
        return folder_train_transform(self.augment, self.image_shape[1:], self.image_size, self.resize_size)

    def eval_transform(self) -> Transform:
        return folder_eval_transform(self.image_size, self.resize_size)

    def batch_augmentation(self) -> RandomCropFlip | None:
        # The padding depends on the image size, which may be read from the images: set in setup.
        return RandomCropFlip(padding=0) if self.augment == "crop_flip" else None

    @property
    def _layout(self) -> str:
        if self.test_split is not None:
            return f"train/ and {self.test_split}/"
        return f"train/ (and optionally {' or '.join(name + '/' for name in _TEST_FOLDERS)})"

    def _check_layout(self, splits: Sequence[str]) -> list[str]:
        return check_image_folder_layout(
            self.data_dir,
            splits,
            self._num_classes,
            dataset=self._dataset,
            layout=self._layout,
            loose_images_hint=self._loose_images_hint,
        )

    def _test_folder(self) -> str | None:
        if self.test_split is not None:
            return self.test_split
        return next((name for name in _TEST_FOLDERS if (self.data_dir / name).is_dir()), None)

    def _listed(self, split: str) -> list[tuple[str, int]]:
        if split not in self._samples:
            self._samples[split] = image_files(self.data_dir / split, self.classes)
        return self._samples[split]

    def _split_samples(self, train: bool) -> list[tuple[str, int]]:
        """The training pool (``train/`` less any held-out test images) or the test split."""
        folder = self._test_folder()
        if folder is not None:
            return self._listed("train" if train else folder)
        if self._held_out is None:
            train_dir = self.data_dir / "train"
            self._held_out = held_out_split(
                self._listed("train"), self.test_fraction, self.seed, train_dir, type(self).__name__
            )
        return self._held_out[0] if train else self._held_out[1]

    def _read_headers(self) -> list[tuple[str, tuple[int, int], str]]:
        """Size and PIL mode of each image of ``stats_files`` and of as many of the test split's (a seeded sample),
        from its header (nothing is decoded): a test image of another size is found before the training, too."""
        if self._headers is None:
            folder = self._test_folder()
            if folder is not None:
                self._check_layout(["train", folder])
            test_files = seeded_sample(self._split_samples(train=False), self.stats_samples, self.seed)
            self._headers = image_headers(self.stats_files + test_files)
        return self._headers

    def _stored_size(self) -> tuple[int, int]:
        return stored_size(self._read_headers())

    def _detected_channels(self) -> int:
        return detected_channels(self._read_headers())

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._computed is None:
            mode = "L" if self.image_shape[0] == 1 else "RGB"
            size = None if self.image_size is not None else self._stored_size()
            images = ImageFiles([(path, 0) for path in self.stats_files], mode, size)
            where = f"training images of {self.data_dir / 'train'} (seed {self.seed})"
            self._computed = sample_statistics(images, self.eval_transform(), where, type(self).__name__)
        return self._computed
