"""Fashion-MNIST (Xiao et al. 2017) read straight from its four IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from freeadv_pl.data.base import VisionDataModule

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package ``dataset-fashion-mnist`` installs the files."""

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or gzipped) as an array of its stated shape.

    Raises:
        ValueError: if the file is not an IDX file of unsigned bytes or its size does not match its header.
    """
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(data) - offset} bytes of data, its header says shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST: 60,000 training and 10,000 test 28×28 grey images of 10 kinds of clothing.

    The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are looked for in ``data_dir`` and in
    ``data_dir/FashionMNIST/raw`` (torchvision's layout). With ``data_dir=None`` they are looked for in
    ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``), then in
    ``./data``. With ``download=True``, :meth:`prepare_data` fetches missing files with torchvision into
    ``data_dir`` (or ``./data``). The whole dataset is held in memory as float32 images in [0, 1].

    Takes the arguments of :class:`~freeadv_pl.data.base.VisionDataModule`.

    Raises:
        FileNotFoundError: in ``setup``, when the files are not found; the message says how to get them.
        RuntimeError: in ``prepare_data``, when ``download=True`` cannot download (no network): the message says
            how else to get the files.

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=64)
        >>> dm.num_classes, dm.image_shape
        (10, (1, 28, 28))
    """

    num_classes = 10
    mean = (0.2860,)
    std = (0.3530,)
    image_shape = (1, 28, 28)

    def prepare_data(self) -> None:
        if self.download and (self._find(train=True) is None or self._find(train=False) is None):
            from torchvision.datasets import FashionMNIST

            self._download_with_torchvision(FashionMNIST, self.data_dir or Path("data"), self._missing_message(True))

    def load_split(self, train: bool) -> Dataset:
        paths = self._find(train)
        if paths is None:
            raise FileNotFoundError(self._missing_message(train))
        images = torch.from_numpy(read_idx(paths[0]).copy())
        labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(
                f"{paths[0]} and {paths[1]} do not match: images {tuple(images.shape)}, labels {len(labels)}"
            )
        return TensorDataset(images.unsqueeze(1).float().div_(255), labels)

    def _search_dirs(self) -> list[Path]:
        roots = [self.data_dir] if self.data_dir is not None else [DEBIAN_DIR, Path("data")]
        return [folder for root in roots for folder in (root, root / "FashionMNIST" / "raw")]

    def _find(self, train: bool) -> tuple[Path, Path] | None:
        for folder in self._search_dirs():
            found = [self._file(folder, name) for name in _FILES[train]]
            if all(found):
                return found[0], found[1]
        return None

    @staticmethod
    def _file(folder: Path, name: str) -> Path | None:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _missing_message(self, train: bool) -> str:
        names = ", ".join(f"{name}[.gz]" for name in _FILES[train])
        looked = ", ".join(str(folder) for folder in self._search_dirs())
        return (
            f"Fashion-MNIST {'training' if train else 'test'} files ({names}) not found in {looked}. Get them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs into /usr/share/datasets/fashion-mnist), "
            "or set download=True to fetch them with torchvision, or set data_dir to the folder that holds them."
        )
