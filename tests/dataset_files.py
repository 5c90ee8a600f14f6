"""Write tiny datasets in the exact on-disk formats the real ones come in (CIFAR and ImageNet cannot be downloaded
here; these files are what torchvision itself reads)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write ``array`` (uint8) as an IDX file: two zero bytes, type 0x08, ndim, big-endian dims, data."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fashion_mnist(folder: Path, n_train: int = 60, n_test: int = 20, compress: bool = True) -> None:
    """The four Fashion-MNIST IDX files with random images and labels cycling through the 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), compress)


def _pickle(path: Path, entry: dict) -> None:
    # The real files were written by Python 2's cPickle: str keys, read back as str with encoding="latin1".
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def write_cifar(root: Path, num_classes: int = 10, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """The python version of CIFAR-10 (``cifar-10-batches-py/``: 5 training batches, ``test_batch``,
    ``batches.meta``) or CIFAR-100 (``cifar-100-python/``: ``train``, ``test``, ``meta``) under ``root``, with
    random images and labels cycling through the classes. Returns the dataset folder."""
    rng = np.random.default_rng(seed)

    def batch(n: int, offset: int, label_keys: tuple[str, ...], name: str) -> dict:
        labels = [(offset + i) % num_classes for i in range(n)]
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        entry["filenames"] = [f"image_{offset + i}.png" for i in range(n)]
        for key in label_keys:
            entry[key] = labels if key != "coarse_labels" else [label % 20 for label in labels]
        return entry

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        sizes = np.array_split(np.arange(n_train), 5)
        for index, part in enumerate(sizes, start=1):
            _pickle(
                folder / f"data_batch_{index}",
                batch(len(part), int(part[0]) if len(part) else 0, ("labels",), f"training batch {index} of 5"),
            )
        _pickle(folder / "test_batch", batch(n_test, 0, ("labels",), "testing batch 1 of 1"))
        _pickle(
            folder / "batches.meta",
            {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 10000, "num_vis": 3072},
        )
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        keys = ("fine_labels", "coarse_labels")
        _pickle(folder / "train", batch(n_train, 0, keys, "training batch 1 of 1"))
        _pickle(folder / "test", batch(n_test, 0, keys, "testing batch 1 of 1"))
        _pickle(
            folder / "meta",
            {
                "fine_label_names": [f"fine_{i}" for i in range(100)],
                "coarse_label_names": [f"coarse_{i}" for i in range(20)],
            },
        )
    return folder


def write_image_folder(
    root: Path, classes: list[str], per_class: int = 2, size: tuple[int, int] = (48, 40), splits=("train", "val")
) -> None:
    """An ImageFolder tree ``root/<split>/<class>/<n>.JPEG`` of random RGB JPEGs (width × height ``size``)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{index}.JPEG", quality=90)


def imagenet_classes(count: int = 1000) -> list[str]:
    """WordNet-style ids like ImageNet's class folders (``n00000000`` ...)."""
    return [f"n{index:08d}" for index in range(count)]


def write_png_folder(
    root: Path,
    classes: list[str],
    per_class: int = 4,
    size: tuple[int, int] = (16, 16),
    splits=("train",),
    mode: str = "RGB",
    seed: int = 0,
) -> list[Path]:
    """An ImageFolder tree ``root/<split>/<class>/<n>.png`` of random PNGs (width × height ``size``, PIL ``mode`` "RGB"
    or "L"): lossless, so the pixels read back are those written. Returns the paths written."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    written = []
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                written.append(folder / f"{index}.png")
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(written[-1])
    return written
