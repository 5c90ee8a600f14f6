"""FGSM adversarial training with a random start ("Fast is better than free", Wong, Rice and Kolter, ICLR 2020)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from freeadv_pl._checks import check_choice
from freeadv_pl.attacks import ModelMode
from freeadv_pl.losses import TrainingLoss
from freeadv_pl.modules._attacked_batch import AttackedBatchModule
from freeadv_pl.modules._perturbation import StoredPerturbation
from freeadv_pl.threat_models import Norm, threat_model

FastInit = Literal["uniform", "zero", "previous"]


class FastAdversarialModule(AttackedBatchModule):
    """FGSM-RS adversarial training: per minibatch, one FGSM step from a random start, then one optimizer step.

    K-PGD training (:class:`PGDAdversarialModule`) with K = 1 and the paper's starts (two forward/backward passes per
    batch): δ₀ from ``init`` (``"uniform"``: δ₀ ~ U(-ε, ε), FGSM-RS; ``"zero"``: plain FGSM; ``"previous"``: the last
    batch's final δ, kept and saved in checkpoints as Free-m's δ is), one step ``δ₀ + step_size · sign(∇_δ loss)``
    projected onto the ε-ball and [0, 1], then one optimizer step on ``CE(f(x + δ), y)``. In L2 (``norm="l2"``) the
    start is the L2 random start and the step ``step_size · ∇ / ‖∇‖₂``; under ``loss="trades"`` the step ascends
    TRADES's KL term and the optimizer step minimises ``CE(f(x), y) + β · KL(f(x) ‖ f(x + δ))``. Larger steps make
    catastrophic overfitting likelier: pair the module with :class:`~freeadv_pl.callbacks.CatastrophicOverfittingGuard`.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        epsilon: the bound ε in the threat model's norm, in pixel units (a float or a string like ``"8/255"``).
        step_size: the FGSM step α in pixel units; None means 1.25 ε.
        init: the start of the step, ``"uniform"`` (the threat model's random start), ``"zero"`` or ``"previous"``.
        attack_mode: the model's mode during the FGSM step: ``"train"`` (the reference code's) or ``"eval"``; None:
            ``"eval"`` under TRADES, ``"train"`` otherwise.
        norm: the threat model, ``"linf"`` or ``"l2"``.
        loss: the training loss, ``"ce"`` or ``"trades"``, or a :class:`~freeadv_pl.losses.TrainingLoss`.
        trades_beta: β of TRADES (the authors' 6.0); used with ``loss="trades"``.
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        ValueError: if ε or ``step_size`` is out of the norm's range (L∞: [0, 1]; L2: finite, ≥ 0), a negative
            ``trades_beta``, or on an unknown ``init``, ``attack_mode``, ``norm`` or ``loss``.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = FastAdversarialModule(SmallCNN(), num_classes=10, epsilon="8/255")
        >>> round(module.step_size * 255, 6)
        10.0
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int | None = None,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        init: FastInit = "uniform",
        attack_mode: ModelMode | None = None,
        norm: Norm = "linf",
        loss: Literal["ce", "trades"] | TrainingLoss = "ce",
        trades_beta: float = 6.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        threat = threat_model(norm)
        radius = threat.radius(epsilon, "epsilon")
        # 1.25 ε by default; at ε = 0 the projection undoes any step, so the step only has to be valid.
        default_step = min(1.25 * radius, threat.max_radius) if radius > 0 else 1.0
        step = default_step if step_size is None else step_size
        self.set_attack(1, radius, step, attack_mode, threat, loss, trades_beta)
        self.init = check_choice(init, "init", ("uniform", "zero", "previous"))
        self._previous = StoredPerturbation()

    @property
    def delta(self) -> Tensor | None:
        """With ``init="previous"``, the last batch's final δ (batch-sized); otherwise None."""
        return self._previous.tensor

    def kept_perturbation(self) -> StoredPerturbation:
        return self._previous

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The FGSM step's start δ₀ for the batch ``x`` (before projection); override it to inject another start."""
        if self.init == "uniform":
            return self.threat.random_start(x, self.epsilon, self.random_generator(x))
        if self.init == "zero":
            return torch.zeros_like(x)
        return self._previous.for_batch(x)

    def after_step(self, x: Tensor, x_adv: Tensor) -> None:
        if self.init == "previous":
            previous = self._previous.for_batch(x)
            # Kept unchanged when the loss is not finite (on_nonfinite_loss="skip"), without a host synchronisation.
            previous.copy_(torch.where(self._nonfinite.flags[-1], x_adv - x, previous))
