"""What a seeded sample of an image folder tells before training: the images' stored size and channels (from their
headers, nothing decoded), and the normalization statistics, given and checked or computed as the model's input
normalization uses them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from freeadv_pl._checks import check_positive
from freeadv_pl.data._folder_files import different_sizes

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def seeded_sample(samples: list[tuple[str, int]], count: int, seed: int) -> list[str]:
    """The paths of ``count`` of ``samples`` (all if fewer) drawn with ``seed``, in their order in ``samples``."""
    chosen = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:count]
    return [samples[index][0] for index in sorted(chosen.tolist())]


def given_statistics(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``mean`` and ``std`` as tuples of floats once checked (given together, positive std, 1 or 3 values or
    ``channels``), or ``(None, None)``: computed from the images."""
    if (mean is None) != (std is None):
        raise ValueError(
            f"mean and std are given together or not at all (then both are computed from the images), got "
            f"mean={mean!r} and std={std!r}"
        )
    if mean is None or std is None:
        return None, None
    mean = tuple(float(value) for value in mean)
    std = tuple(check_positive(float(value), "each std") for value in std)
    if len(mean) != len(std) or len(mean) not in (1, 3) or (channels is not None and len(mean) != channels):
        wanted = f"{channels} values each (channels={channels})" if channels is not None else "1 or 3 values each"
        raise ValueError(f"mean and std must have {wanted}, got {len(mean)} and {len(std)} values")
    return mean, std


def channel_statistics(images: Iterable[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation over every pixel of ``images`` (each C×H×W, of any size), the
    standard deviation of the whole population (no Bessel correction), as the model's input normalization uses them.

    Raises:
        ValueError: if ``images`` is empty.

    Example:
        >>> channel_statistics([torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])])
        ((0.5,), (0.5,))
    """
    total = squares = None
    count = 0
    for image in images:
        pixels = image.to(torch.float64).flatten(1)
        total = pixels.sum(1) if total is None else total + pixels.sum(1)
        squares = pixels.square().sum(1) if squares is None else squares + pixels.square().sum(1)
        count += pixels.shape[1]
    if total is None or squares is None:
        raise ValueError("channel_statistics needs at least one image")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def sample_statistics(images: Dataset, transform: Any, where: str, owner: str) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of ``images`` (a dataset of ``(PIL image, label)``, each image put through
    ``transform``), logged in one line naming ``where`` they come from (``owner``: the DataModule's name).

    Raises:
        ValueError: when a channel is constant (std 0), which normalization would divide by.
    """
    mean, std = channel_statistics(transform(images[index][0]) for index in range(len(images)))
    if min(std) == 0:
        raise ValueError(
            f"the {len(images)} sampled {where} are constant in a channel (std {std}), which input normalization "
            "would divide by: give mean=... and std=... (e.g. std=1.0 per channel)"
        )
    rank_zero_info(
        f"{owner}: mean={[round(v, 4) for v in mean]}, std={[round(v, 4) for v in std]} from {len(images)} {where}; "
        "give mean and std to skip this."
    )
    return mean, std


def image_headers(paths: Iterable[str]) -> list[tuple[str, tuple[int, int], str]]:
    """``(path, (width, height), PIL mode)`` of each image, read from its header (nothing is decoded)."""
    headers = []
    for path in paths:
        with Image.open(path) as image:
            headers.append((path, image.size, image.mode))
    return headers


def stored_size(headers: Sequence[tuple[str, tuple[int, int], str]]) -> tuple[int, int]:
    """The one ``(width, height)`` of the images of ``headers``.

    Raises:
        ValueError: when two differ, naming both and the fix (``image_size``).
    """
    path, size, _ = headers[0]
    different = next((header for header in headers if header[1] != size), None)
    if different is not None:
        raise ValueError(different_sizes(different[0], different[1], f"{path} is", size))
    return size


def detected_channels(headers: Iterable[tuple[str, tuple[int, int], str]]) -> int:
    """1 if every image of ``headers`` is grayscale (PIL mode "L", "1", "I", ...), else 3."""
    return 1 if all(mode in _GRAYSCALE_MODES for _, _, mode in headers) else 3
