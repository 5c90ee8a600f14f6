"""The files of a folder of class folders (torchvision's ImageFolder layout): the layout checks, the listing of the
images, the test split held out of ``train/`` when there is no test folder, and the dataset that reads them (used by
:class:`~freeadv_pl.data.image_folder.ImageFolderDataModule`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(_is_image(entry) for entry in entries)


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_split(root: Path, split: str, dataset: str, layout: str, loose_images_hint: str) -> list[str]:
    split_dir = root / split
    if not split_dir.is_dir():
        moved = [name for name in _class_folders(root) if _has_image(root / name)] if split == "train" else []
        hint = f" ({root} itself holds class folders, {_listing(moved)}: move them into {split_dir}/)" if moved else ""
        raise FileNotFoundError(
            f"{dataset} split folder {split_dir} does not exist: data_dir must hold {layout}, each with one folder per "
            f"class (the ImageFolder layout){hint}"
        )
    classes = _class_folders(split_dir)
    loose_images = _has_image(split_dir)
    if not classes or loose_images:
        raise ValueError(
            f"{split_dir} must hold one folder per class with the images inside, but it holds "
            f"{'images directly' if loose_images else 'no class folders'}. {loose_images_hint}"
        )
    empty = [name for name in classes if not _has_image(split_dir / name)]
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) of {split_dir} hold no image ({', '.join(IMG_EXTENSIONS[:3])}, ...): "
            f"{_listing(empty)}. Restore their images or remove the class from every split."
        )
    return classes


def check_image_folder_layout(
    root: Path,
    splits: Sequence[str],
    num_classes: int | None = None,
    *,
    dataset: str = "image",
    layout: str = "train/",
    loose_images_hint: str = "Put each image in the folder of its class: <split>/<class>/<image>.",
) -> list[str]:
    """Check ``root/<split>/<class>/<image>`` for each split and return the class names (sorted, as ImageFolder).

    Every split must exist, hold one folder per class and no loose images, have the same class folders as the
    other splits, every class folder at least one image (directly inside it), and there must be at least two classes
    (``num_classes`` of them, if given). ``dataset``, ``layout`` and ``loose_images_hint`` word the messages.

    Raises:
        FileNotFoundError: if ``root`` or a split is missing.
        ValueError: on loose images in a split, class folders that differ between splits, an empty class
            folder, a single class, or a number of classes other than ``num_classes``; the message says what to do.

    Example:
        >>> check_image_folder_layout(Path("/no/such/folder"), ["train"])
        Traceback (most recent call last):
        ...
        FileNotFoundError: image folder /no/such/folder does not exist: set data_dir to the folder that holds train/
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"{dataset} folder {root} does not exist: set data_dir to the folder that holds {layout}"
        )
    found = {split: _check_split(root, split, dataset, layout, loose_images_hint) for split in splits}
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
    if len(classes) < 2:
        raise ValueError(
            f"{root / splits[0]} holds a single class folder ({classes[0]}): a classifier needs at least 2 classes. "
            "Add a folder of images for each class."
        )
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(
            f"{root} has {len(classes)} classes but num_classes={num_classes}: set data.init_args.num_classes to "
            f"{len(classes)} (and the backbone's num_classes with it)."
        )
    return classes


def image_files(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, label)`` of every image directly inside ``split_dir/<class>/``, sorted by class, then by name."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        with os.scandir(split_dir / name) as entries:
            names = sorted(entry.name for entry in entries if _is_image(entry))
        samples += [(str(split_dir / name / file), label) for file in names]
    return samples


def different_sizes(path: str, size: tuple[int, int], other: str, other_size: tuple[int, int]) -> str:
    return (
        f"the images differ in size ({path} is {size[0]}×{size[1]}, {other} {other_size[0]}×{other_size[1]}) and "
        f"image_size=None uses them at their stored size: set image_size=... (e.g. image_size={min(size)}) to resize "
        "and center-crop every image to one square size."
    )


def held_out_split(
    samples: list[tuple[str, int]], fraction: float, seed: int, where: Path, owner: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)``: ``fraction`` of ``samples`` (the images of ``where``, at least one) drawn with ``seed`` as the
    test split, both in their order in ``samples``; one log line says so (``owner``: the DataModule's name).

    Raises:
        ValueError: when no training image would be left.
    """
    count = max(1, round(fraction * len(samples)))
    if count >= len(samples):
        raise ValueError(
            f"test_fraction={fraction} of the {len(samples)} images of {where} leaves no training image: lower "
            "test_fraction, or add a test/ folder of class folders"
        )
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    rank_zero_info(
        f"{owner}: {where.parent} has no test or val folder, so {count} of the {len(samples)} images of train/ "
        f"(test_fraction={fraction}, seed {seed}) are the test split."
    )
    return (
        [sample for index, sample in enumerate(samples) if index not in held_out],
        [samples[index] for index in sorted(held_out)],
    )


class ImageFiles(Dataset):
    """``(image, label)`` for each ``(path, label)`` of ``samples`` (torchvision's ``ImageFolder.samples``), the image
    read with PIL and converted to ``mode`` ("L" or "RGB"). With ``size`` (width, height), an image of another size is
    an error that names the file and the fix, found from its header before it is decoded."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, size: tuple[int, int] | None = None) -> None:
        self.samples = samples
        self.mode = mode
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            if self.size is not None and image.size != self.size:
                raise ValueError(different_sizes(path, image.size, "the sampled images are", self.size))
            return image.convert(self.mode), label
