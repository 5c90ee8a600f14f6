"""A perturbation per training image: Free-m's δ with ``delta_memory="example"``."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from freeadv_pl.data.augmentation import CropFlip

BANK_KEY = "freeadv_pl_delta_bank"
_SYNC_CHUNK_BYTES = 64 * 2**20  # the bank crosses between processes in pieces of this size


class PerturbationBank:
    """δ for every training image, ``(len(training set), *image)``, float32, in the frame of the un-augmented image,
    on the training device (``location="device"``) or in host memory (``"cpu"``); the same on every process after
    :meth:`synchronise` (docs/design.md, "Where the bank lives, and whether it fits", and "DDP")."""

    def __init__(self, location: str, key: str = BANK_KEY) -> None:
        self.location = location
        self.key = key  # the checkpoint entry: a module keeping several banks gives each its own
        self.tensor: Tensor | None = None
        self._touched: Tensor | None = None  # under DDP: the rows this process updated since the last sync

    def allocate(self, size: int, example_shape: tuple[int, ...], trainer: Trainer) -> None:
        """Make the bank of zeros, or check and move the one a checkpoint gave back.

        Raises:
            ValueError: if a resumed bank has another number of rows, or the bank does not fit.
        """
        device = self._device(trainer)
        if self.tensor is not None:
            if tuple(self.tensor.shape) != (size, *example_shape):
                raise ValueError(
                    f"the checkpoint's δ bank has shape {tuple(self.tensor.shape)} but the training set has {size} "
                    f"images of shape {example_shape}: resume with the training set of the run that wrote it (same "
                    "train_size, val_size and seed)."
                )
        else:
            _check_fits(size * math.prod(example_shape) * 4, device, trainer)
        bank = torch.zeros((size, *example_shape)) if self.tensor is None else self.tensor.to(torch.float32)
        if device.type == "cpu" and trainer.strategy.root_device.type == "cuda":
            bank = bank.pin_memory()  # host-to-device copies of each batch's rows
        self.tensor = bank.to(device)
        self._touched = torch.zeros(size, dtype=torch.bool, device=device) if trainer.world_size > 1 else None

    def rows(self, index: Tensor, x: Tensor, crop_flip: CropFlip | None) -> tuple[Tensor, Tensor]:
        """The batch's δ in the frame of ``x`` (a new tensor on ``x``'s device and dtype), and its stored rows."""
        if self.tensor is None:
            raise RuntimeError("the δ bank is used before allocate(): on_train_start allocates it")
        stored = self.tensor[index.to(self.tensor.device)].to(x.device, non_blocking=True)
        delta = stored if crop_flip is None else crop_flip.apply(stored)
        if delta.shape != x.shape:
            raise ValueError(
                f"the δ bank's images have shape {tuple(self.tensor.shape[1:])} but the batch's are "
                f"{tuple(x.shape[1:])}: with delta_memory='example' the loader must not resize or crop the "
                "training images (VisionDataModule(return_index=True) moves crop and flip to the device)."
            )
        return delta.to(x.dtype), stored

    def store(self, index: Tensor, delta: Tensor, stored: Tensor, crop_flip: CropFlip | None) -> None:
        """Write the batch's δ back into its rows (through the inverse crop and flip)."""
        if crop_flip is not None:
            delta = crop_flip.invert(delta.to(stored.dtype), stored)
        bank_index = index.to(self.tensor.device)
        self.tensor[bank_index] = delta.to(self.tensor.device, self.tensor.dtype)
        if self._touched is not None:
            self._touched[bank_index] = True

    def reset(self) -> None:
        if self.tensor is not None:
            self.tensor.zero_()

    def synchronise(self, trainer: Trainer) -> None:
        """Give every process the same bank (a collective call under DDP; nothing to do in one process)."""
        if self._touched is None or trainer.world_size == 1:
            return
        strategy, device = trainer.strategy, trainer.strategy.root_device
        counts = strategy.reduce(self._touched.to(device, torch.int32), reduce_op="sum").to(self.tensor.device)
        # Each row comes from the processes that updated it; a row nobody updated, from process 0 (all hold it).
        keep = self._touched | ((counts == 0) & (trainer.global_rank == 0))
        rows_per_chunk = max(1, _SYNC_CHUNK_BYTES // (self.tensor[0].numel() * 4))
        for start in range(0, self.tensor.shape[0], rows_per_chunk):
            part = slice(start, start + rows_per_chunk)
            chunk = self.tensor[part].masked_fill(~_rows(keep[part], self.tensor), 0.0)
            total = strategy.reduce(chunk.to(device), reduce_op="sum").to(self.tensor.device)
            self.tensor[part] = total / _rows(counts[part].clamp(min=1), total)
        self._touched.zero_()

    def save(self, checkpoint: dict[str, Any], trainer: Trainer) -> None:
        """Put the bank (on the CPU) into a checkpoint dictionary, after merging the processes' rows (collective)."""
        self.synchronise(trainer)
        if self.tensor is not None:
            checkpoint[self.key] = self.tensor.detach().to("cpu", copy=True)

    def load(self, checkpoint: dict[str, Any], trainer: Trainer | None) -> None:
        self.tensor = checkpoint.get(self.key)
        if self.tensor is None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                "the checkpoint holds no δ bank (it was written with delta_memory='batch', or before the first "
                "batch): delta_memory='example' starts from δ = 0 for every image."
            )

    def _device(self, trainer: Trainer) -> torch.device:
        return torch.device("cpu") if self.location == "cpu" else trainer.strategy.root_device


def training_set_shape(trainer: Trainer, needed_by: str) -> tuple[int, tuple[int, ...]]:
    """The number of training images and one image's shape, the size of a bank with a row per image.

    Raises:
        ValueError: if the training DataLoader's dataset has no length or cannot be indexed (``needed_by`` names what
            needs the bank in the message).
    """
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        size, example = len(dataset), dataset[0]
    except TypeError:
        raise ValueError(
            f"{needed_by} needs a training DataLoader over a dataset with a length and indexable examples (a map-style "
            f"Dataset), got {type(dataset).__name__}: its bank has one row per image."
        ) from None
    return size, tuple(example[0].shape)


def require_index(index: Tensor | None, needed_by: str) -> Tensor:
    """The batch's image indices, which key a bank's rows.

    Raises:
        ValueError: if the batch is ``(x, y)``, with the fix (``needed_by`` names what needs the indices).
    """
    if index is None:
        raise ValueError(
            f"{needed_by} needs training batches (x, y, index), index each image's position in the training set, got "
            "(x, y): set the DataModule's return_index=True (data.init_args.return_index: true in a config), or give "
            "a dataset whose examples are (image, label, index)."
        )
    return index


def _rows(per_row: Tensor, like: Tensor) -> Tensor:
    """A per-row vector shaped to broadcast over ``like``'s rows."""
    return per_row.view(-1, *[1] * (like.dim() - 1))


def _check_fits(nbytes: int, device: torch.device, trainer: Trainer) -> None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where, copies = f"free memory of {device}", 1
    else:
        free = _available_host_memory()
        # Every process of this machine holds its own copy in host memory.
        where, copies = "available host memory", max(1, trainer.world_size // max(1, trainer.num_nodes))
    if free is not None and nbytes * copies > free:
        raise ValueError(
            f"delta_memory='example' needs a δ bank of {nbytes / 2**30:.2f} GiB per process"
            f"{f' × {copies} processes' if copies > 1 else ''} but the {where} is {free / 2**30:.2f} GiB. Keep the "
            "bank in host memory (delta_bank='cpu') when the GPU's memory is short, train on fewer images "
            "(train_size), or use delta_memory='batch' (one batch of δ, the paper's)."
        )


def _available_host_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else the free physical pages, else None (unknown)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
