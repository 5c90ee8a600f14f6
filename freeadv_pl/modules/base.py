"""The LightningModule every training algorithm of the package builds on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl.models.normalization import InputNormalization


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """SGD with the paper's CIFAR settings: lr 0.1, momentum 0.9, weight decay 2e-4."""
    return SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


class ClassifierModule(LightningModule):
    """An image classifier trained with manual optimization; subclasses define what one training batch does.

    Images reach the module in [0, 1]; ``mean``/``std`` normalization is applied inside the model
    (:class:`~freeadv_pl.models.InputNormalization`), so perturbations are in pixel units. Every module of the
    package uses manual optimization and steps the learning-rate scheduler itself: once per optimizer step by
    default (schedules are written in optimizer steps, ``trainer.global_step``, whatever the number of steps per
    batch), or once per training epoch with ``lr_scheduler_interval="epoch"``.

    Validation and test log the natural accuracy and loss (``val/acc``, ``val/loss``, ``test/acc``,
    ``test/loss``); training logs ``train/loss`` and ``train/acc`` on the inputs of the last optimizer step.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to ``num_classes`` logits.
        num_classes: number of classes (linked from the DataModule by the CLI).
        mean: per-channel means for input normalization, or None.
        std: per-channel standard deviations for input normalization, or None.
        optimizer: a callable from parameters to an optimizer (default: :func:`default_optimizer`).
        lr_scheduler: a callable from the optimizer to a scheduler, or None.
        lr_scheduler_interval: step the scheduler after every optimizer step (``"step"``: milestones count optimizer
            steps, m per batch for Free-m) or after every training epoch (``"epoch"``: milestones count epochs, as
            the official ImageNet code's schedule, whatever the number of GPUs or batches per epoch).
        channels_last: keep the model's weights in the channels-last memory format (faster convolutions with
            bf16/fp16 on recent GPUs); the first convolution gives its output that format, the layers after it keep
            it. Images and δ stay in the batch's own format.
        compile: compile the model (normalization + backbone) with ``torch.compile`` (``nn.Module.compile``: the
            checkpoint keys do not change) at set-up; the attacks and every replay use the compiled model.

    Raises:
        TypeError: if ``backbone`` is not an ``nn.Module``.
        ValueError: if ``num_classes`` < 2, on an unknown ``lr_scheduler_interval``, on a ``ReduceLROnPlateau``
            scheduler, when the first training batch is
            outside [0, 1] or the backbone's logits do not have ``num_classes`` columns.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                "backbone must be a torch.nn.Module such as freeadv_pl.models.SmallCNN(), "
                f"got {type(backbone).__name__}"
            )
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.model = InputNormalization(backbone, mean, std)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = check_choice(lr_scheduler_interval, "lr_scheduler_interval", ("step", "epoch"))
        self.channels_last = channels_last
        self.compile_model = compile
        self.automatic_optimization = False
        self._inputs_checked = False
        self._compiled = False
        self._training_logged = False
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])

    passes_per_batch: int = 1
    """Forward/backward passes per training minibatch, the paper's unit of cost (read by ``TrainingTime``)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        # Metrics are made here, not in __init__, so that spawned processes do not share them (DESIGN.md, 6).
        self.val_accuracy = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(self.num_classes, average="micro")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_model and not self._compiled:
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(
                "lr_scheduler=ReduceLROnPlateau is not supported: the module steps its scheduler itself, without a "
                "metric. Use a step- or epoch-indexed schedule such as MultiStepLR or OneCycleLR."
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }

    def on_train_start(self) -> None:
        self._training_logged = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._inputs_checked:
            self._check_pixel_range(batch[0])
            self._inputs_checked = True

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def fit_step(self, inputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on ``CE(model(inputs), y)``: zero the gradients, one backward, step (and the scheduler's
        step with ``lr_scheduler_interval="step"``).

        ``self.manual_backward`` (never ``loss.backward()``) keeps DDP's gradient all-reduce and AMP's loss
        scaling; gradients of other leaves of the graph (a perturbation δ) are filled by the same backward.

        Returns:
            The loss and the logits, both still attached to the graph.
        """
        optimizer = self.optimizers()
        logits = self(inputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the backbone outputs {logits.shape[-1]} logits but num_classes={self.num_classes}: set the "
                "backbone's num_classes to the dataset's number of classes."
            )
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        if self.lr_scheduler_interval == "step":
            self._step_lr_scheduler()
        return loss, logits

    def on_train_epoch_end(self) -> None:
        if self.lr_scheduler_interval == "epoch":
            self._step_lr_scheduler()

    def _step_lr_scheduler(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def log_training(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Log the loss and accuracy of the last optimizer step, as tensors (no host synchronisation here), on the
        first training batch of ``fit`` and on the batches whose metrics the Trainer writes (every
        ``trainer.log_every_n_steps`` batches); between them, the progress bar and ``trainer.callback_metrics`` show
        the last logged values. Each ``self.log`` costs Lightning's result bookkeeping, about 0.5 ms of host time: on
        a GPU, logging every batch slowed small models' training by several percent (benchmarks/README.md)."""
        if self._training_logged and not self.trainer._logger_connector.should_update_logs:
            return
        self._training_logged = True
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", (logits.detach().argmax(dim=1) == y).float().mean(), prog_bar=True)

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy.update(logits, y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{prefix}/acc", accuracy, prog_bar=True)

    def _check_pixel_range(self, x: Tensor) -> None:
        low, high = x.min().item(), x.max().item()
        if low < 0 or high > 1:
            raise ValueError(
                f"training images must be in [0, 1] pixel space, got values in [{low:.3g}, {high:.3g}]. Remove any "
                "Normalize transform from the data pipeline and pass mean/std to the module instead."
            )


def check_trainer_for_manual_optimization(trainer: Trainer) -> None:
    """Reject Trainer settings that manual optimization cannot honour, with the fix in the message.

    Lightning raises too, later and in general terms; the CLI calls this before ``fit`` for a clearer answer.

    Raises:
        ValueError: if ``accumulate_grad_batches`` > 1 or ``gradient_clip_val`` is set.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported: freeadv_pl modules "
            "use manual optimization and take one optimizer step per replay. Remove accumulate_grad_batches (or set "
            "it to 1) and raise data.batch_size instead."
        )
    if trainer.gradient_clip_val is not None:
        raise ValueError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} is not supported: freeadv_pl modules use manual "
            "optimization, where Lightning does not clip gradients. Remove gradient_clip_val from the trainer."
        )
