"""FGSM adversarial training with a random start ("Fast is better than free", Wong, Rice and Kolter, ICLR 2020)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_choice
from freeadv_pl.attacks import ModelMode, pgd, uniform_perturbation
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules._perturbation import StoredPerturbation
from freeadv_pl.modules.base import ClassifierModule

FastInit = Literal["uniform", "zero", "previous"]


class FastAdversarialModule(ClassifierModule):
    """FGSM-RS adversarial training: per minibatch, one FGSM step from a random start, then one optimizer step.

    Per batch: δ₀ from ``init`` (``"uniform"``: δ₀ ~ U(-ε, ε), the paper's FGSM-RS), projected so that x + δ₀ lies
    in [0, 1]; one step ``δ = δ₀ + step_size · sign(∇_δ CE(f(x + δ₀), y))``, projected onto the ε-ball and [0, 1];
    then one optimizer step on ``CE(f(x + δ), y)``. Two forward/backward passes per batch. The step is taken with
    ``torch.autograd.grad``, so weight gradients stay untouched until the optimizer step.

    ``step_size`` defaults to 1.25 ε (10/255 at ε = 8/255), the paper's choice; larger steps make catastrophic
    overfitting (PGD accuracy collapsing within an epoch) likelier: pair the module with
    :class:`~freeadv_pl.callbacks.CatastrophicOverfittingGuard`. The paper's other starts: ``"zero"`` (plain FGSM
    training, prone to overfitting) and ``"previous"`` (the last batch's final δ, kept across batches like Free-m's
    δ and saved in checkpoints per process, resumed as :class:`FreeAdversarialModule` resumes its δ: a Free training
    with one replay and an extra pass). Checkpoints do not hold the global RNG state, so a run resumed with
    ``"uniform"`` draws other random starts than the uninterrupted run.

    Model mode during the FGSM step: ``attack_mode="train"`` (the default) follows the reference code, where the
    whole step runs with the model in training mode; ``"eval"`` takes it in evaluation mode.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes.
        epsilon: the L∞ bound ε, in pixel units (a float or a string like ``"8/255"``).
        step_size: the FGSM step α in pixel units; None means 1.25 ε.
        init: the start of the step, ``"uniform"``, ``"zero"`` or ``"previous"``.
        attack_mode: ``"train"`` or ``"eval"``, the model's mode during the FGSM step.
        **kwargs: ``mean``, ``std``, ``optimizer``, ``lr_scheduler``, ``lr_scheduler_interval`` of
            :class:`ClassifierModule`.

    Raises:
        ValueError: if ε is outside [0, 1], ``step_size`` is not in (0, 1], ``init`` or ``attack_mode`` is unknown.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = FastAdversarialModule(SmallCNN(), num_classes=10, epsilon="8/255")
        >>> round(module.step_size * 255, 6)
        10.0
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        init: FastInit = "uniform",
        attack_mode: ModelMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.epsilon = as_pixel_fraction(epsilon, "epsilon")
        if step_size is None:
            # At ε = 0 the projection undoes any step, so the step only has to be valid.
            self.step_size = min(1.25 * self.epsilon, 1.0) if self.epsilon > 0 else 1.0
        else:
            self.step_size = as_pixel_fraction(step_size, "step_size", allow_zero=False)
        self.init = check_choice(init, "init", ("uniform", "zero", "previous"))
        self.attack_mode = check_choice(attack_mode, "attack_mode", ("train", "eval"))
        self._previous = StoredPerturbation()

    passes_per_batch = 2  # the FGSM step and the optimizer step

    @property
    def delta(self) -> Tensor | None:
        """With ``init="previous"``, the last batch's final δ (batch-sized); otherwise None."""
        return self._previous.tensor

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The FGSM step's start δ₀ for the batch ``x`` (before projection); override it to inject another start."""
        if self.init == "uniform":
            return uniform_perturbation(x, self.epsilon)
        if self.init == "zero":
            return torch.zeros_like(x)
        return self._previous.for_batch(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        x_adv = pgd(
            self.model,
            x,
            y,
            epsilon=self.epsilon,
            step_size=self.step_size,
            steps=1,
            init=self.initial_perturbation(x),
            model_mode=self.attack_mode,
        )
        loss, logits = self.fit_step(x_adv, y)
        if self.init == "previous":
            previous = self._previous.for_batch(x)
            # Kept unchanged when the loss is not finite (on_nonfinite_loss="skip"), without a host synchronisation.
            previous.copy_(torch.where(torch.isfinite(loss.detach()), x_adv - x, previous))
        self.log_training(loss, logits, y)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self._previous.save(checkpoint, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._previous.load(checkpoint, self._trainer)
