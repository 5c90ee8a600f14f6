"""K-PGD adversarial training, Algorithm 1 of the Free paper (Madry et al., ICLR 2018)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from freeadv_pl.attacks import ModelMode
from freeadv_pl.losses import TRADES, TrainingLoss
from freeadv_pl.modules._attacked_batch import AttackedBatchModule
from freeadv_pl.threat_models import Norm

TRADES_START = 0.001
"""The scale of the TRADES authors' start, δ = 0.001·N(0, I) (then projected onto the ball and [0, 1])."""


class PGDAdversarialModule(AttackedBatchModule):
    """K-PGD adversarial training: per minibatch, a K-step PGD attack with the weights frozen, then one optimizer
    step on the adversarial batch (K + 1 forward/backward passes).

    Each batch starts from a fresh perturbation (:meth:`initial_perturbation`: the threat model's random start, δ ~
    U(-ε, ε) in L∞, with ``random_start``, else 0; under TRADES δ = 0.001·N(0, I), the authors' start); K steps of
    size α along the norm's steepest-ascent direction (the sign of the input gradient in L∞), each projected onto the
    ε-ball and [0, 1]. The attack runs the model in ``attack_mode``: ``"train"`` (Madry et al.'s reference code:
    batch-norm uses and updates batch statistics) or ``"eval"`` (the TRADES authors'). Under ``loss="trades"`` the
    attack maximises the KL term and the optimizer step minimises ``CE(f(x), y) + β · KL(f(x) ‖ f(x_adv))``.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        steps: K, the number of attack steps (≥ 1).
        epsilon: the bound ε in the threat model's norm, in pixel units (a float or a string like ``"8/255"``).
        step_size: the attack step α, in pixel units.
        random_start: start each attack from the random start (Madry et al.; 0.001·N(0, I) under TRADES); otherwise
            from δ = 0.
        attack_mode: ``"train"`` or ``"eval"``, the model's mode during the attack; None: ``"eval"`` under TRADES,
            ``"train"`` otherwise.
        norm: the threat model, ``"linf"`` or ``"l2"``.
        loss: the training loss, ``"ce"`` or ``"trades"``, or a :class:`~freeadv_pl.losses.TrainingLoss`.
        trades_beta: β of TRADES (the authors' 6.0); used with ``loss="trades"``.
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        ValueError: if ``steps`` < 1, ε or ``step_size`` is out of the norm's range (L∞: [0, 1]; L2: finite, ≥ 0), a
            negative ``trades_beta``, or on an unknown ``attack_mode``, ``norm`` or ``loss``.

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
        attack_mode: ModelMode | None = None,
        norm: Norm = "linf",
        loss: Literal["ce", "trades"] | TrainingLoss = "ce",
        trades_beta: float = 6.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.set_attack(steps, epsilon, step_size, attack_mode, norm, loss, trades_beta)
        self.random_start = random_start

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The attack's starting δ for the batch ``x``; override it to inject another start."""
        if not self.random_start:
            return torch.zeros_like(x)
        generator = self.random_generator(x)
        if isinstance(self.training_loss, TRADES):
            device = x.device if generator is None else generator.device
            noise = torch.randn(x.shape, dtype=x.dtype, device=device, generator=generator)
            return (TRADES_START * noise).to(x.device)
        return self.threat.random_start(x, self.epsilon, generator)
