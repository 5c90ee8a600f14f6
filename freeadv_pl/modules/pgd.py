"""K-PGD adversarial training, Algorithm 1 of the Free paper (Madry et al., ICLR 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from freeadv_pl.attacks import ModelMode, uniform_perturbation
from freeadv_pl.modules._attacked_batch import AttackedBatchModule


class PGDAdversarialModule(AttackedBatchModule):
    """K-PGD adversarial training: per minibatch, a K-step PGD attack with the weights frozen, then one optimizer
    step on the adversarial batch (K + 1 forward/backward passes).

    Each batch starts from a fresh perturbation (:meth:`initial_perturbation`: δ ~ U(-ε, ε) with ``random_start``,
    else 0); K steps of size α with the sign of the input gradient, each projected onto the ε-ball and [0, 1]. The
    attack runs the model in ``attack_mode``: ``"train"`` (Madry et al.'s reference code: batch-norm uses and updates
    batch statistics) or ``"eval"``.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        steps: K, the number of attack steps (≥ 1).
        epsilon: the L∞ bound ε, in pixel units (a float or a string like ``"8/255"``).
        step_size: the attack step α, in pixel units.
        random_start: start each attack from δ ~ U(-ε, ε) (Madry et al.); otherwise from δ = 0.
        attack_mode: ``"train"`` or ``"eval"``, the model's mode during the attack.
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

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
        num_classes: int | None = None,
        steps: int = 7,
        epsilon: float | str = 8 / 255,
        step_size: float | str = 2 / 255,
        random_start: bool = True,
        attack_mode: ModelMode = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.set_attack(steps, epsilon, step_size, attack_mode)
        self.random_start = random_start

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The attack's starting δ for the batch ``x``; override it to inject another start."""
        return (
            uniform_perturbation(x, self.epsilon, self.random_generator(x))
            if self.random_start
            else torch.zeros_like(x)
        )
