"""The LightningModule every training algorithm of the package builds on."""

from __future__ import annotations

import os
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.classification import MulticlassAccuracy

from freeadv_pl._checks import check_int, check_positive
from freeadv_pl._lightning_compat import resumes_after_last_batch, should_update_logs
from freeadv_pl._step_random import StepRandom
from freeadv_pl.export import export_classifier
from freeadv_pl.losses import CrossEntropy, TrainingLoss
from freeadv_pl.models.normalization import InputNormalization
from freeadv_pl.modules._checkpoint import attached_trainer, read_identity, rebuild_error, write_identity
from freeadv_pl.modules._checks import check_first_batch, take_from_data
from freeadv_pl.modules._collapse_signals import AttackGain, GradientAlignment
from freeadv_pl.modules._cuda_graph import float_learning_rates
from freeadv_pl.modules._nonfinite import NonFiniteLosses
from freeadv_pl.modules.manual_optimization import OptimizerSteps, default_optimizer


class ClassifierModule(LightningModule):
    """An image classifier trained with manual optimization; subclasses define what one training batch does.

    Images reach the module in [0, 1]; ``mean``/``std`` normalization runs inside the model
    (:class:`~freeadv_pl.models.InputNormalization`), so perturbations are in pixel units. ``num_classes``, ``mean``
    and ``std`` that are not given are taken at set-up from the attached DataModule where it declares them (one log
    line says so), so the module fits any ``LightningCLI`` or script. The module steps its LR scheduler itself: once
    per optimizer step (``trainer.global_step``) or once per epoch. Validation and test log ``val/acc``,
    ``val/loss``, ``test/acc``, ``test/loss``; training logs ``train/loss`` and ``train/acc`` of the last optimizer
    step. The design is in docs/design.md, "Manual optimization".

    Args:
        backbone: any ``nn.Module`` mapping normalized images to ``num_classes`` logits. An ``InputNormalization``
            with statistics (a pretrained backbone: :func:`freeadv_pl.models.torchvision_backbone`) is the model
            as it is: it normalizes with its weights' own statistics, and ``mean``/``std`` are not used.
        num_classes: number of classes; None: the DataModule's ``num_classes``.
        mean: per-channel means for input normalization; None: the DataModule's ``mean``, if it declares one. To
            train without normalization on data that declare it, pass ``mean=[0.0]`` and ``std=[1.0]``.
        std: per-channel standard deviations, given or taken with ``mean``.
        optimizer: a callable from parameters to an optimizer (default: :func:`default_optimizer`).
        lr_scheduler: a callable from the optimizer to a scheduler, or None.
        lr_scheduler_interval: step the scheduler after every optimizer step (``"step"``: milestones count optimizer
            steps, m per batch for Free-m) or after every training epoch (``"epoch"``).
        channels_last: keep the model's weights in the channels-last memory format (faster bf16/fp16 convolutions).
        compile: compile the model (normalization + backbone) with ``nn.Module.compile`` at set-up.
        gradient_clip_norm: clip the weight gradient to this L2 norm before every optimizer step (after DDP's
            all-reduce and fp16 unscaling), or None; it replaces ``Trainer(gradient_clip_val=...)``.
        on_nonfinite_loss: ``"raise"``: training stops at the end of a batch whose loss was NaN or inf, with a
            ``FloatingPointError`` naming the step. ``"skip"``: such optimizer steps and their δ update are skipped,
            counted per epoch as ``train/skipped_steps`` (summed over processes), with a warning.

    Raises:
        TypeError: if ``backbone`` is not an ``nn.Module``.
        ValueError: if ``num_classes`` < 2, on an unknown ``lr_scheduler_interval`` or ``on_nonfinite_loss``, a
            ``gradient_clip_norm`` ≤ 0, a ``ReduceLROnPlateau`` scheduler; at set-up when ``num_classes`` is neither
            given nor declared by the DataModule, or differs from the DataModule's; when the first training batch is
            outside [0, 1] or has labels outside [0, ``num_classes``); when the backbone's logits do not have
            ``num_classes`` columns; when loading a checkpoint written by another training module.
        FloatingPointError: with ``on_nonfinite_loss="raise"``, at the end of a batch whose loss was not finite.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = ClassifierModule(SmallCNN())  # num_classes, mean and std come from the DataModule at set-up
        >>> module.num_classes is None
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        channels_last: bool = False,
        compile: bool = False,
        gradient_clip_norm: float | None = None,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                "backbone must be a torch.nn.Module such as freeadv_pl.models.SmallCNN(), "
                f"got {type(backbone).__name__}"
            )
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", minimum=2)
        # A pretrained backbone (freeadv_pl.models.torchvision_backbone, ...) brings its weights' own statistics.
        self.pretrained_statistics = isinstance(backbone, InputNormalization) and backbone.mean is not None
        self.model = backbone if self.pretrained_statistics else InputNormalization(backbone, mean, std)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._steps = OptimizerSteps(lr_scheduler_interval)
        self.channels_last = channels_last
        self.compile_model = compile
        self.gradient_clip_norm = (
            None if gradient_clip_norm is None else check_positive(gradient_clip_norm, "gradient_clip_norm")
        )
        self._nonfinite = NonFiniteLosses(on_nonfinite_loss)
        self._random = StepRandom()
        self._alignment = GradientAlignment()
        self._attack_gain = AttackGain()
        self.training_loss: TrainingLoss = CrossEntropy()  # the adversarial modules take loss="ce" | "trades"
        self.automatic_optimization = False
        self._inputs_checked = False
        self.input_shape: tuple[int, ...] | None = None  # one image's, from the first batch (saved in checkpoints)
        self._compiled = False
        self._training_logged = False
        self._epoch_to_finish = False  # resumed from a checkpoint written after an epoch's last batch
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``. A checkpoint of ``freeadv_pl fit`` rebuilds its backbone from the
        run's recorded configuration, so the path alone is enough; any other needs ``backbone=...``.

        Raises:
            ValueError: when the checkpoint records no backbone and none is given, naming both ways to load it.
        """
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except (ArgumentError, TypeError) as error:
            if "backbone" in kwargs or "backbone" not in str(error):
                raise
            raise rebuild_error(cls, checkpoint_path, error) from None

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per training minibatch, the paper's unit of cost (read by ``TrainingTime``)."""
        return 1

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        take_from_data(self, getattr(attached_trainer(self), "datamodule", None))
        # Metrics are made here, not in __init__, so that spawned processes do not share them (docs/design.md,
        # "Distributed evaluation and metrics").
        self.val_accuracy = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(self.num_classes, average="micro")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_model and not self._compiled:
            self.model.compile()
            self._compiled = True

    @property
    def on_nonfinite_loss(self) -> str:
        """``"raise"`` or ``"skip"``: what a NaN or infinite training loss does."""
        return self._nonfinite.policy

    def configure_optimizers(self) -> Any:
        return self._steps.configure(self.optimizer_factory, self.lr_scheduler_factory, self.parameters())

    def on_train_start(self) -> None:
        self._training_logged = False
        self._nonfinite.start(self.trainer)
        self._random.start()
        self._steps.start(self, ClassifierModule)
        if self._epoch_to_finish:  # resumed after an epoch's last batch: Lightning skips that epoch's end
            self._epoch_to_finish = False
            self.finish_epoch()
            self._alignment.reset()
            self._attack_gain.reset()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._inputs_checked:
            check_first_batch(batch[0], batch[1], self.num_classes)
            self._inputs_checked = True
            self.input_shape = tuple(batch[0].shape[1:])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._nonfinite.end_batch(self, batch_idx)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Lightning calls this inside optimizer.step(): after DDP's all-reduce and, under 16-mixed, after unscaling.
        self._nonfinite.before_optimizer_step(optimizer)
        if self.gradient_clip_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_norm, gradient_clip_algorithm="norm")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def fit_step(
        self,
        inputs: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        clean: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One optimizer step on the module's training loss at ``inputs`` (and the LR scheduler's, per step); its one
        backward also fills the gradients of other leaves (a perturbation δ). ``clean`` is the clean batch, which a
        loss that reads the clean logits (TRADES) runs the model on first; ``loss_fn(logits, y)`` replaces the
        training loss. Returns the loss and the adversarial logits, still attached to the graph. See docs/design.md,
        "The direct optimizer step", for the two paths it takes."""
        loss, logits = self._optimizer_step(inputs, y, loss_fn, clean=clean)
        self._after_optimizer_step(torch.isfinite(loss.detach()))
        return loss, logits

    def _optimizer_step(
        self,
        inputs: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        clean: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`fit_step` without its host-side bookkeeping (the step count, the scheduler): what a CUDA graph
        captures."""
        clean_logits = self(clean) if clean is not None and self.training_loss.needs_clean else None
        logits = self(inputs)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the backbone outputs {logits.shape[-1]} logits but num_classes={self.num_classes}: set the "
                "backbone's num_classes to the dataset's number of classes."
            )
        loss = self.training_loss(logits, y, clean_logits) if loss_fn is None else loss_fn(logits, y)
        self._steps.step(self, loss)
        return loss, logits

    def _after_optimizer_step(self, finite: Tensor) -> None:
        """Keep the step's finiteness flag, advance ``trainer.global_step`` after a direct step, step the scheduler."""
        self._nonfinite.record(finite)
        self._steps.after_step()

    def on_train_epoch_end(self) -> None:
        self.finish_epoch()
        self._nonfinite.end_epoch(self)
        self._alignment.end_epoch(self)
        self._attack_gain.end_epoch(self)

    def grad_alignment(self) -> float | None:
        """This epoch's mean gradient alignment so far (logged at the epoch's end as ``train/grad_alignment``): the
        cosine between the input gradient that built each training perturbation and the input gradient at the
        perturbed point, averaged over examples and processes; None for a module that records none. Under several
        processes every process must call it. See docs/design.md, "Gradient alignment"."""
        return self._alignment.epoch_mean(self)

    def attack_gain(self) -> float | None:
        """This epoch's mean attack gain so far (logged at the epoch's end as ``train/attack_gain``): the training loss
        at each batch's final perturbation over the loss at its start, averaged over batches and processes; None for a
        module that records none (Free-m records it: its last replay's loss over its first's). Under several
        processes every process must call it. See docs/design.md, "The attack gain"."""
        return self._attack_gain.epoch_mean(self)

    def finish_epoch(self) -> None:
        """What the end of a training epoch does to the training state: step an epoch-interval LR scheduler."""
        self._steps.end_epoch()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_identity(checkpoint, self, ClassifierModule)
        float_learning_rates(checkpoint)  # the same checkpoint with or without a CUDA graph
        for state in self._training_state():
            state.save(checkpoint, self.trainer)  # collective under DDP: every process builds the checkpoint

    def kept_perturbation(self) -> Any:
        """The perturbation state this module keeps across batches and saves in checkpoints (an object with
        ``save(checkpoint, trainer)`` and ``load(checkpoint, trainer_or_None)``), or None."""
        return None

    def random_generator(self, x: Tensor) -> torch.Generator | None:
        """The generator of this batch's random draws on ``x``'s device, a function of the run's seed, the process
        and ``trainer.global_step`` (exact resume); None (the global RNG) outside ``fit``."""
        return self._random.generator(x.device, attached_trainer(self))

    def _training_state(self) -> list[Any]:
        kept = self.kept_perturbation()
        signals = [self._random, self._alignment, self._attack_gain]
        return signals if kept is None else [*signals, kept]

    def export(self, path: str | os.PathLike, input_shape: Sequence[int] | None = None) -> dict[str, Path]:
        """Write the model for use without freeadv_pl (:func:`freeadv_pl.export.export_classifier`): a
        ``torch.export`` program taking images in [0, 1], the backbone's ``state_dict`` and a JSON description.

        Args:
            path: the program's file, ending in ``.pt2``.
            input_shape: one image's shape; None: the one the module trained on (recorded from the first training
                batch and kept in checkpoints).

        Raises:
            ValueError: when no input shape is known or given, or the backbone cannot be traced.
        """
        shape = input_shape if input_shape is not None else self.input_shape
        if shape is None:
            raise ValueError(
                "the module has not seen a training batch, so its input shape is unknown: pass input_shape, e.g. "
                "module.export('model.pt2', input_shape=(3, 32, 32)) (freeadv_pl export --input_shape 3,32,32)."
            )
        info = {"module": f"{type(self).__module__}.{type(self).__qualname__}", "num_classes": self.num_classes}
        if getattr(self, "epsilon", None) is not None:
            info["trained_epsilon"] = float(self.epsilon)
        return export_classifier(self.model, path, shape, info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.input_shape = read_identity(checkpoint, self, ClassifierModule) or self.input_shape
        for state in self._training_state():
            state.load(checkpoint, attached_trainer(self))
        loop = checkpoint.get("loops", {}).get("fit_loop")
        self._epoch_to_finish = bool(loop) and resumes_after_last_batch(loop)

    def log_training(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        """Log the loss and accuracy of the last optimizer step (tensors: no host synchronisation) on the first
        training batch and on those whose metrics the Trainer writes (every ``trainer.log_every_n_steps``)."""
        if self._training_logged and not should_update_logs(self.trainer):
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
