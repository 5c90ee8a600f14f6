"""The per-epoch signals a training module logs that can warn of catastrophic overfitting without running an attack:
the gradient alignment (``train/grad_alignment``) and Free-m's attack gain (``train/attack_gain``); docs/design.md,
"Gradient alignment" and "The attack gain"."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor


class EpochMean:
    """The epoch's mean of a per-example or per-batch value, over the epoch and the processes, logged at the epoch's
    end as ``train/<name>``.

    Sums stay on the device (no host synchronisation per batch); :meth:`epoch_mean` sums them over the processes once
    per epoch. A checkpoint keeps the epoch's running sums (summed over the processes), so an epoch resumed part-way
    reports the mean over all of its batches.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._sums: Tensor | None = None  # (sum of values, count), float64, on the training device
        self._restored: list[float] | None = None  # sums from a checkpoint, added at the next batch
        self._value: tuple[int, float | None] | None = None  # (epoch, mean) once computed for an epoch

    @property
    def checkpoint_key(self) -> str:
        return f"freeadv_pl_{self.name}"

    def add_values(self, values: Tensor) -> None:
        """Add the values of a 1-D tensor; non-finite ones (from a NaN gradient or loss) are left out."""
        values = values.detach().double()
        finite = torch.isfinite(values)
        batch = torch.stack([torch.where(finite, values, 0.0).sum(), finite.sum().double()])
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
        """Log ``train/<name>`` for the epoch (when recorded) and start the next epoch's sums."""
        mean = self.epoch_mean(module)
        if mean is not None:
            module.log(f"train/{self.name}", mean)
        self.reset()

    def reset(self) -> None:
        """Drop the sums: the next :meth:`add` starts a new epoch."""
        self._sums, self._restored, self._value = None, None, None

    def save(self, checkpoint: dict[str, Any], trainer: Trainer) -> None:
        """Put the epoch's sums so far, summed over the processes, into the checkpoint (a collective call)."""
        totals = self._totals(trainer, trainer.strategy.root_device)
        if totals[1] > 0:
            checkpoint[self.checkpoint_key] = totals.tolist()

    def load(self, checkpoint: dict[str, Any], trainer: Trainer | None) -> None:
        """Take the sums back; the first process carries them, so that the sum over the processes is the saved one."""
        saved = checkpoint.get(self.checkpoint_key)
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


class GradientAlignment(EpochMean):
    """``train/grad_alignment``: the epoch's mean, over examples and processes, of the cosine between two input
    gradients of each example: the gradient that built a perturbation and the gradient at the perturbed point."""

    def __init__(self) -> None:
        super().__init__("grad_alignment")

    def add(self, built: Tensor, at_perturbed: Tensor) -> None:
        """Add each example's cosine between ``built`` and ``at_perturbed`` (shape ``(B, ...)``)."""
        built, at_perturbed = built.flatten(1).double(), at_perturbed.flatten(1).double()
        self.add_values(F.cosine_similarity(built, at_perturbed, dim=1, eps=1e-30))


class AttackGain(EpochMean):
    """``train/attack_gain``: the epoch's mean, over batches and processes, of the training loss at a batch's final
    perturbation over the loss at its start (Free-m: its last replay's loss over its first's)."""

    def __init__(self) -> None:
        super().__init__("attack_gain")

    def add(self, start_loss: Tensor, final_loss: Tensor) -> None:
        """Add one batch's ratio ``final_loss / start_loss`` (scalar tensors)."""
        self.add_values((final_loss.detach().double() / start_loss.detach().double()).reshape(1))
