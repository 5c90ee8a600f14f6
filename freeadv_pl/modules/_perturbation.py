"""A perturbation kept across minibatches: Free-m's δ, and FGSM's "previous" start."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

CHECKPOINT_KEY = "freeadv_pl_delta"


class StoredPerturbation:
    """A batch-sized perturbation δ carried from one minibatch to the next, one per process.

    A plain tensor, not a registered buffer: DDP broadcasts buffers from rank 0, and each rank must keep its own δ
    (DESIGN.md, invariant 2). Allocated as zeros at the first batch, on the batch's device and dtype; a smaller
    last batch uses ``δ[:B]``; a larger batch grows δ with zero rows and a warning.
    """

    def __init__(self) -> None:
        self.tensor: Tensor | None = None

    def for_batch(self, x: Tensor) -> Tensor:
        """``δ[:B]`` for the batch ``x``: a view, so writing into it updates the stored δ."""
        batch = x.shape[0]
        if self.tensor is None:
            self.tensor = torch.zeros_like(x)
        elif self.tensor.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"input shape changed from {tuple(self.tensor.shape[1:])} to {tuple(x.shape[1:])}: the stored "
                "perturbation δ cannot be carried over. Use one image size for the whole training."
            )
        if self.tensor.device != x.device or self.tensor.dtype != x.dtype:
            self.tensor = self.tensor.to(device=x.device, dtype=x.dtype)
        if batch > self.tensor.shape[0]:
            warnings.warn(
                f"a batch of {batch} is larger than the stored perturbation δ ({self.tensor.shape[0]}): δ grows, "
                "with zeros for the new rows",
                stacklevel=3,
            )
            extra = torch.zeros_like(x[: batch - self.tensor.shape[0]])
            self.tensor = torch.cat([self.tensor, extra])
        return self.tensor[:batch]

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Put δ (on the CPU) into a checkpoint dictionary, if it exists yet."""
        if self.tensor is not None:
            checkpoint[CHECKPOINT_KEY] = self.tensor.detach().cpu()

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Take δ back from a checkpoint dictionary (None if it holds none); it moves to the batch's device lazily."""
        self.tensor = checkpoint.get(CHECKPOINT_KEY)
