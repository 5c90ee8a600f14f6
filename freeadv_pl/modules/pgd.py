"""K-PGD adversarial training, Algorithm 1 of the Free paper (Madry et al., ICLR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl.attacks import ModelMode, pgd, uniform_perturbation
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules.base import ClassifierModule


class PGDAdversarialModule(ClassifierModule):
    """K-PGD adversarial training: per minibatch, a K-step PGD attack with the weights frozen, then one optimizer
    step on the adversarial batch.

    Each batch starts from a fresh perturbation (:meth:`initial_perturbation`: δ ~ U(-ε, ε) with
    ``random_start``, else 0); K steps of size α with the sign of the input gradient, each projected onto the
    ε-ball and [0, 1]. The attack takes gradients with ``torch.autograd.grad`` only, so weight gradients and
    weights are untouched until the optimizer step. One batch costs K + 1 forward/backward passes.

    Model mode during the attack: ``attack_mode="train"`` (the default) follows Madry et al.'s reference code,
    where the attack runs the model in training mode: batch-norm uses batch statistics (and updates its running
    averages). ``attack_mode="eval"`` attacks the model in evaluation mode instead.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes.
        steps: K, the number of attack steps (≥ 1).
        epsilon: the L∞ bound ε, in pixel units (a float or a string like ``"8/255"``).
        step_size: the attack step α, in pixel units.
        random_start: start each attack from δ ~ U(-ε, ε) (Madry et al.); otherwise from δ = 0.
        attack_mode: ``"train"`` or ``"eval"``, the model's mode during the attack.
        **kwargs: ``mean``, ``std``, ``optimizer``, ``lr_scheduler`` of :class:`ClassifierModule`.

    Raises:
        ValueError: if ``steps`` < 1, ε is outside [0, 1], ``step_size`` is not in (0, 1] or ``attack_mode`` is
            unknown.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = PGDAdversarialModule(SmallCNN(), num_classes=10, steps=7, epsilon="8/255", step_size="2/255")
        >>> module.steps
        7
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int,
        steps: int = 7,
        epsilon: float | str = 8 / 255,
        step_size: float | str = 2 / 255,
        random_start: bool = True,
        attack_mode: ModelMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.steps = check_int(steps, "steps", minimum=1)
        self.epsilon = as_pixel_fraction(epsilon, "epsilon")
        self.step_size = as_pixel_fraction(step_size, "step_size", allow_zero=False)
        self.random_start = random_start
        self.attack_mode = check_choice(attack_mode, "attack_mode", ("train", "eval"))

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: K for the attack, one for the optimizer step."""
        return self.steps + 1

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The attack's starting δ for the batch ``x``; override it to inject another start."""
        return uniform_perturbation(x, self.epsilon) if self.random_start else torch.zeros_like(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        x_adv = pgd(
            self.model,
            x,
            y,
            epsilon=self.epsilon,
            step_size=self.step_size,
            steps=self.steps,
            init=self.initial_perturbation(x),
            model_mode=self.attack_mode,
        )
        loss, logits = self.fit_step(x_adv, y)
        self.log_training(loss, logits, y)
