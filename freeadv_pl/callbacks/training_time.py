"""The paper's "Training Time" column for any run: wall time, optimizer steps and forward/backward passes."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class TrainingTime(Callback):
    """Measure what a ``fit`` cost: wall time (training alone and with validation), optimizer steps, minibatches and
    forward/backward passes, logged at every training epoch's end and printed, with a summary, when ``fit`` ends.

    A forward/backward pass is the paper's unit of cost: a natural step is one, a Free-m minibatch m, a K-PGD
    minibatch K + 1 and an FGSM-RS minibatch 2 (the module's ``passes_per_batch``). Training time runs from the first
    training batch of ``fit`` to its end, without validation (sanity check included) or the set-up before the loop;
    on CUDA the clock is read after a device synchronisation, at epoch boundaries only.

    Logged per training epoch: ``time/train_minutes`` and ``time/passes`` (running totals). :attr:`summary` holds
    the totals after ``fit``, per process: ``fit_minutes``, ``train_minutes``, ``validation_minutes``,
    ``optimizer_steps``, ``batches``, ``passes``, ``passes_per_batch``, ``world_size``.

    Example:
        >>> callback = TrainingTime()
        >>> callback.summary
        {}
    """

    def __init__(self) -> None:
        self.summary: dict[str, float] = {}
        self._fit_start = 0.0
        self._train_seconds = 0.0
        self._validation_seconds = 0.0
        self._segment_start: float | None = None
        self._validation_start = 0.0
        self._trainer: Trainer | None = None
        self._first_step = 0
        self._steps_before = 0
        self._batches = 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Here, not in on_fit_start: a resumed fit loads this callback's state between the two.
        self._trainer = trainer
        if stage == "fit":
            self.summary = {}
            self._train_seconds = self._validation_seconds = 0.0
            self._steps_before = self._batches = 0

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = _clock(pl_module)
        self._segment_start = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not in on_fit_start: a resumed fit restores trainer.global_step between the two.
        self._first_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._segment_start is None:
            self._segment_start = _clock(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_training_segment(pl_module)
        self._validation_start = _clock(pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_seconds += _clock(pl_module) - self._validation_start

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_training_segment(pl_module)
        pl_module.log("time/train_minutes", self._train_seconds / 60.0, on_step=False, on_epoch=True)
        pl_module.log("time/passes", float(self._passes(pl_module)), on_step=False, on_epoch=True)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_training_segment(pl_module)
        self.summary = {
            "fit_minutes": (_clock(pl_module) - self._fit_start) / 60.0,
            "train_minutes": self._train_seconds / 60.0,
            "validation_minutes": self._validation_seconds / 60.0,
            "optimizer_steps": self._optimizer_steps(trainer),
            "batches": self._batches,
            "passes": self._passes(pl_module),
            "passes_per_batch": _passes_per_batch(pl_module),
            "world_size": trainer.world_size,
        }
        s = self.summary
        rank_zero_info(
            f"Training time: {s['train_minutes']:.2f} min training + {s['validation_minutes']:.2f} min validation "
            f"({s['fit_minutes']:.2f} min in fit); {s['optimizer_steps']} optimizer steps, {s['batches']} minibatches, "
            f"{s['passes']} forward/backward passes ({s['passes_per_batch']} per minibatch) per process, "
            f"{s['world_size']} process(es)"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            # A checkpoint written in the middle of a training segment counts that segment up to now.
            "train_seconds": self._train_seconds
            + (0.0 if self._segment_start is None else time.perf_counter() - self._segment_start),
            "validation_seconds": self._validation_seconds,
            "optimizer_steps": self._optimizer_steps(self._trainer) if self._trainer is not None else 0,
            "batches": self._batches,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run goes on adding to what it had spent before the interruption (the time of the interrupted
        # epoch after its last checkpoint is lost with it).
        self._train_seconds = state_dict["train_seconds"]
        self._validation_seconds = state_dict["validation_seconds"]
        self._steps_before = state_dict["optimizer_steps"]
        self._batches = state_dict["batches"]

    def _optimizer_steps(self, trainer: Trainer) -> int:
        return self._steps_before + trainer.global_step - self._first_step

    def _close_training_segment(self, pl_module: LightningModule) -> None:
        if self._segment_start is not None:
            self._train_seconds += _clock(pl_module) - self._segment_start
            self._segment_start = None

    def _passes(self, pl_module: LightningModule) -> int:
        return self._batches * _passes_per_batch(pl_module)


def _passes_per_batch(pl_module: LightningModule) -> int:
    return int(getattr(pl_module, "passes_per_batch", 1))


def _clock(pl_module: LightningModule) -> float:
    """``time.perf_counter()`` after the module's CUDA device, if any, has finished its queued work."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
    return time.perf_counter()
