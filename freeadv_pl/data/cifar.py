"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) read from the pickled batches that torchvision downloads."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from freeadv_pl.data.augmentation import RandomCropFlip
from freeadv_pl.data.base import Transform, VisionDataModule


def read_cifar_batches(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read pickled CIFAR batches (the "python version" of the dataset) into uint8 images N×3×32×32 and labels.

    Each file holds a dict with ``data`` (N×3072 bytes: the red, then green, then blue 32×32 planes) and the labels
    under ``label_key`` (``labels`` for CIFAR-10, ``fine_labels`` for CIFAR-100), as torchvision reads them.

    Raises:
        ValueError: if a file lacks these keys or their sizes do not match.
    """
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as handle:
            entry: dict[str, Any] = pickle.load(handle, encoding="latin1")
        if "data" not in entry or label_key not in entry:
            raise ValueError(
                f"{path} is not a CIFAR batch: expected keys 'data' and {label_key!r}, got {sorted(entry)}"
            )
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(entry[label_key]):
            raise ValueError(
                f"{path} holds data of shape {data.shape} and {len(entry[label_key])} labels; a CIFAR batch holds "
                "N×3072 bytes and N labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class _CIFARDataModule(VisionDataModule):
    """What CIFAR-10 and CIFAR-100 share; see :class:`CIFAR10DataModule`."""

    dataset_name: str  # "CIFAR-10": torchvision's class CIFAR10, the archive cifar-10-python.tar.gz
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # the labels' key in a batch; the class names are under its "label_names" form
    image_shape = (3, 32, 32)

    def __init__(self, *args: Any, augment: bool = True, **kwargs: Any) -> None:
        self.augment = augment  # before the base's __init__, which asks batch_augmentation()
        super().__init__(*args, **kwargs)
        self.classes: list[str] | None = None

    def prepare_data(self) -> None:
        if self.download and self._find() is None:
            import torchvision.datasets

            dataset_class = getattr(torchvision.datasets, self.dataset_name.replace("-", ""))
            self._download_with_torchvision(dataset_class, self._root(), self._missing_message())

    def load_split(self, train: bool) -> Dataset:
        folder = self._find()
        if folder is None:
            raise FileNotFoundError(self._missing_message())
        with open(folder / self.meta_file, "rb") as handle:
            meta = pickle.load(handle, encoding="latin1")
        if self._names_key not in meta:
            raise ValueError(
                f"{folder / self.meta_file} has no {self._names_key!r} (it has {sorted(meta)}): is this "
                f"{self.dataset_name}?"
            )
        self.classes = list(meta[self._names_key])
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{folder / self.meta_file} names {len(self.classes)} classes, {self.dataset_name} has "
                f"{self.num_classes}: is this the right dataset?"
            )
        images, labels = read_cifar_batches(
            [folder / name for name in (self.train_files if train else self.test_files)], self.label_key
        )
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(
                f"labels in {folder} range over [{int(labels.min())}, {int(labels.max())}], expected "
                f"[0, {self.num_classes - 1}]"
            )
        return TensorDataset(images, labels)

    def train_transform(self) -> Transform:
        # The standard CIFAR augmentation (also Madry et al.'s and the Free paper's): zero-pad 4, random 32×32 crop,
        # horizontal flip; then uint8 → float in [0, 1]. With return_index the crop and flip run on the device.
        on_loader = self.augment and not self.return_index
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if on_loader else []
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])

    def batch_augmentation(self) -> RandomCropFlip | None:
        return RandomCropFlip(padding=4) if self.augment else None

    def eval_transform(self) -> Transform:
        return v2.ToDtype(torch.float32, scale=True)

    def _root(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path("data")

    def _find(self) -> Path | None:
        names = (*self.train_files, *self.test_files, self.meta_file)
        for folder in (self._root() / self.folder, self._root()):
            if all((folder / name).is_file() for name in names):
                return folder
        return None

    @property
    def _names_key(self) -> str:
        return self.label_key.replace("labels", "label_names")

    def _missing_message(self) -> str:
        root = self._root()
        files = ", ".join((*self.train_files, *self.test_files, self.meta_file))
        return (
            f"{self.dataset_name} not found: expected the folder {self.folder}/ with "
            f"{files} (the python version, cifar-*-python.tar.gz, extracted) in {root} or these files in {root} "
            "itself. Set download=True where there is a network, or download "
            f"https://www.cs.toronto.edu/~kriz/{self.dataset_name.lower()}-python.tar.gz and extract it there, or set data_dir to the folder "
            "that holds it."
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32×32 colour images of 10 classes.

    Reads the pickled batches of the dataset's python version from ``data_dir/cifar-10-batches-py/`` (torchvision's
    layout; ``data_dir`` defaults to ``./data``) or from ``data_dir`` itself. With ``download=True``,
    :meth:`prepare_data` fetches the archive with torchvision where there is a network. The whole dataset is held
    in memory as uint8 (150 MB).

    Training images are augmented (4-pixel zero padding, random 32×32 crop, horizontal flip) unless
    ``augment=False``, in the loader, or with ``return_index=True`` on the batch's device (the batch then carries
    the crops and flips, for a per-image δ); validation and test images are not. Images reach the model in [0, 1];
    the dataset's ``mean``/``std`` are exposed for the model's input normalization.

    Args:
        augment: augment the training images.
        **kwargs: the arguments of :class:`~freeadv_pl.data.base.VisionDataModule`.

    Raises:
        FileNotFoundError: in ``setup``, when the files are not found; the message says where to put them.
        ValueError: in ``setup``, when the files are not CIFAR-10 batches.
        RuntimeError: in ``prepare_data``, when ``download=True`` cannot download (no network): the message says
            where to put the files instead.

    Example:
        >>> data = CIFAR10DataModule(batch_size=128, val_size=0)
        >>> data.num_classes, data.image_shape
        (10, (3, 32, 32))
    """

    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    dataset_name = "CIFAR-10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test 32×32 colour images of 100 classes (the fine labels).

    Reads ``data_dir/cifar-100-python/{train,test,meta}`` (torchvision's layout; ``data_dir`` defaults to
    ``./data``) or these files in ``data_dir`` itself; otherwise as :class:`CIFAR10DataModule`.

    Example:
        >>> CIFAR100DataModule().num_classes
        100
    """

    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    dataset_name = "CIFAR-100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
