"""A perturbation kept across minibatches: Free-m's δ, and FGSM's "previous" start."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

CHECKPOINT_KEY = "freeadv_pl_delta"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # δ has the images' (floating) dtype


class StoredPerturbation:
    """A batch-sized perturbation δ carried from one minibatch to the next, one per process, as a plain tensor
    (docs/design.md, "δ, the perturbation Free-m keeps", and its "Checkpoints and resuming").

    Allocated as zeros at the first batch, on the batch's device and dtype; a smaller last batch uses ``δ[:B]``; a
    larger batch grows δ with zero rows and a warning. In a checkpoint, ``checkpoint["freeadv_pl_delta"] =
    {"world_size": W, "per_rank": [δ_0, ..., δ_{W-1}]}`` (CPU tensors; None for a process without δ yet). A checkpoint
    written before δ was saved per process holds one tensor: it counts as the δ of a one-process run.
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

    def reset(self) -> None:
        """Set δ to zero (its shape is kept)."""
        if self.tensor is not None:
            self.tensor.zero_()

    def save(self, checkpoint: dict[str, Any], trainer: Trainer) -> None:
        """Put every process's δ (on the CPU) into a checkpoint dictionary, if any process has one yet.

        Under several processes this is a collective call: every process must make it (``on_save_checkpoint``).
        """
        if trainer.world_size > 1:
            per_rank = _gather(self.tensor, trainer)
        else:
            per_rank = [None if self.tensor is None else self.tensor.detach().to("cpu", copy=True)]
        if any(delta is not None for delta in per_rank):
            checkpoint[CHECKPOINT_KEY] = {"world_size": len(per_rank), "per_rank": per_rank}

    def load(self, checkpoint: dict[str, Any], trainer: Trainer | None) -> None:
        """Take this process's δ back from a checkpoint dictionary (None if it holds none for this process); it moves
        to the batch's device lazily. Another number of processes warns only in ``fit``, where δ matters; without a
        trainer (``load_from_checkpoint``) this is rank 0's δ."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            self.tensor = None
            return
        per_rank = [saved] if isinstance(saved, Tensor) else saved["per_rank"]
        rank = 0 if trainer is None else trainer.global_rank
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.world_size != len(per_rank):
            rank_zero_warn(_world_size_message(len(per_rank), trainer.world_size))
        self.tensor = per_rank[rank] if rank < len(per_rank) else None


def _gather(tensor: Tensor | None, trainer: Trainer) -> list[Tensor | None]:
    """Every process's δ, on every process (on the CPU; None where a process has none).

    ``all_gather`` needs one shape on all processes, so three of them: each δ's number of dimensions and dtype, its
    shape, then the values, flattened and zero-padded to the largest δ, in the widest dtype (an exact conversion).
    """
    strategy, device = trainer.strategy, trainer.strategy.root_device
    ndim, code = (0, -1) if tensor is None else (tensor.dim(), _DTYPES.index(tensor.dtype))
    infos = strategy.all_gather(torch.tensor([ndim, code], device=device)).tolist()
    width = max(rank_ndim for rank_ndim, _ in infos)
    if width == 0:
        return [None] * len(infos)
    shape = [0] * width if tensor is None else [*tensor.shape, *[0] * (width - ndim)]
    gathered_shapes = strategy.all_gather(torch.tensor(shape, device=device)).tolist()
    shapes = [row[:rank_ndim] for row, (rank_ndim, _) in zip(gathered_shapes, infos, strict=True)]
    sizes = [math.prod(rank_shape) if rank_shape else 0 for rank_shape in shapes]
    dtype = functools.reduce(torch.promote_types, (_DTYPES[rank_code] for _, rank_code in infos if rank_code >= 0))
    flat = torch.zeros(max(sizes), dtype=dtype, device=device)
    if tensor is not None:
        flat[: tensor.numel()] = tensor.detach().reshape(-1).to(dtype)
    values = strategy.all_gather(flat).cpu()
    return [
        values[rank, :size].reshape(rank_shape).to(_DTYPES[rank_code], copy=True) if rank_shape else None
        for rank, (rank_shape, size, (_, rank_code)) in enumerate(zip(shapes, sizes, infos, strict=True))
    ]


def _world_size_message(saved: int, current: int) -> str:
    if saved < current:
        effect = f"process r takes back δ_r for r < {saved} and starts from δ = 0 for r ≥ {saved}"
    else:
        effect = f"process r takes back δ_r for r < {current}; δ_r for r ≥ {current} is not used"
    return (
        f"the checkpoint holds the perturbation δ_r of {saved} process(es) but this run has {current}: {effect}. "
        f"For an exact continuation, resume with {saved} process(es) (devices × num_nodes)."
    )
