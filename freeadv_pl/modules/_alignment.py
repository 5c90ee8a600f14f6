"""The gradient alignment a training module logs per epoch (``train/grad_alignment``): an alarm for catastrophic
overfitting that runs no attack (docs/design.md, "Gradient alignment")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

CHECKPOINT_KEY = "freeadv_pl_grad_alignment"


class GradientAlignment:
    """The epoch's mean, over examples and processes, of the cosine between two input gradients of each example: the
    gradient that built a perturbation and the gradient at the perturbed point.

    Sums stay on the device (no host synchronisation per batch); :meth:`epoch_mean` sums them over the processes once
    per epoch. A checkpoint keeps the epoch's running sums (summed over the processes), so an epoch resumed part-way
    reports the mean over all of its batches.
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None  # (sum of cosines, count), float64, on the training device
        self._restored: list[float] | None = None  # sums from a checkpoint, added at the next batch
        self._value: tuple[int, float | None] | None = None  # (epoch, mean) once computed for an epoch

    def add(self, built: Tensor, at_perturbed: Tensor) -> None:
        """Add each example's cosine between ``built`` and ``at_perturbed`` (shape ``(B, ...)``); non-finite cosines
        (a NaN gradient) are left out."""
        cosine = F.cosine_similarity(built.flatten(1).double(), at_perturbed.flatten(1).double(), dim=1, eps=1e-30)
        finite = torch.isfinite(cosine)
        batch = torch.stack([torch.where(finite, cosine, 0.0).sum(), finite.sum().double()])
        if self._sums is None:
            self._sums = torch.zeros(2, dtype=torch.float64, device=batch.device)
            if self._restored is not None:
                self._sums += torch.tensor(self._restored, dtype=torch.float64, device=batch.device)
                self._restored = None
        self._sums += batch
        self._value = None

    def epoch_mean(self, module: LightningModule) -> float | None:
        """The current epoch's mean cosine summed over the processes, or None where no process recorded one. A
        collective call under several processes (every process makes it); computed once per epoch."""
        epoch = module.current_epoch
        if self._value is None or self._value[0] != epoch:
            self._value = (epoch, self._reduce(module.trainer, module.device))
        return self._value[1]

    def end_epoch(self, module: LightningModule) -> None:
        """Log ``train/grad_alignment`` for the epoch (when recorded) and start the next epoch's sums."""
        mean = self.epoch_mean(module)
        if mean is not None:
            module.log("train/grad_alignment", mean)
        self.reset()

    def reset(self) -> None:
        """Drop the sums: the next :meth:`add` starts a new epoch."""
        self._sums, self._restored, self._value = None, None, None

    def save(self, checkpoint: dict[str, Any], trainer: Trainer) -> None:
        """Put the epoch's sums so far, summed over the processes, into the checkpoint (a collective call)."""
        totals = self._totals(trainer, trainer.strategy.root_device)
        if totals[1] > 0:
            checkpoint[CHECKPOINT_KEY] = totals.tolist()

    def load(self, checkpoint: dict[str, Any], trainer: Trainer | None) -> None:
        """Take the sums back; the first process carries them, so that the sum over the processes is the saved one."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        rank = 0 if trainer is None else trainer.global_rank
        self._sums, self._value = None, None
        self._restored = list(saved) if saved is not None and rank == 0 else None

    def _totals(self, trainer: Trainer | None, device: torch.device) -> Tensor:
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        if self._sums is not None:
            totals += self._sums.to(device)
        if self._restored is not None:
            totals += torch.tensor(self._restored, dtype=torch.float64, device=device)
        if trainer is not None and trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return totals.cpu()

    def _reduce(self, trainer: Trainer, device: torch.device) -> float | None:
        total, count = self._totals(trainer, device).tolist()
        return None if count == 0 else total / count
