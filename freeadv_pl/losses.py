"""Training losses of the adversarial modules, as functions of the clean and the adversarial logits.

A training loss gives the trainers two things: the objective the weights minimise (:meth:`TrainingLoss.__call__`,
averaged over the batch) and the objective an attack maximises (:meth:`TrainingLoss.attack_loss`, summed over the
batch). Cross-entropy is the default; TRADES (Zhang et al., ICML 2019) is the other built-in. A user's own loss is a
subclass, passed as ``loss=MyLoss()`` (or ``class_path`` in a config); the eager replay and the CUDA graph both call
it. The design is in docs/design.md, "Training losses".

This module imports nothing from Lightning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from freeadv_pl._checks import check_choice

__all__ = ["TRADES", "CrossEntropy", "TrainingLoss", "training_loss"]


class TrainingLoss:
    """The loss a trainer minimises, of the adversarial logits, the labels and (where :attr:`needs_clean`) the clean
    logits.

    Subclass it for a loss of your own: set :attr:`needs_clean` if ``__call__`` reads the clean logits (the trainer
    then runs the model on the clean batch too, before the adversarial one), implement ``__call__`` (averaged over the
    batch) and, if the attack should maximise something else than the summed cross-entropy, :meth:`attack_loss`.

    Example:
        >>> import torch
        >>> class Smoothed(TrainingLoss):
        ...     name = "smoothed-ce"
        ...     def __call__(self, adversarial, y, clean=None):
        ...         return F.cross_entropy(adversarial, y, label_smoothing=0.1)
        >>> round(Smoothed()(torch.zeros(2, 3), torch.tensor([0, 1])).item(), 4)  # log 3: uniform logits
        1.0986
    """

    name = "custom"
    needs_clean = False
    """Whether the loss reads the clean logits: one more forward pass per optimizer step."""

    def __call__(self, adversarial: Tensor, y: Tensor, clean: Tensor | None = None) -> Tensor:
        """The training objective, averaged over the batch."""
        raise NotImplementedError

    def attack_loss(self, clean: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """What an attack on this loss maximises, as a function of (adversarial logits, labels) summed over the batch
        (summed, so that each example's gradient is its own whatever the batch size); ``clean`` holds the clean logits
        where :attr:`needs_clean`, detached. The summed cross-entropy by default."""
        return lambda logits, y: F.cross_entropy(logits, y, reduction="sum")

    def describe(self) -> str:
        """The loss as reports and logs name it."""
        return self.name


class CrossEntropy(TrainingLoss):
    """``CE(f(x_adv), y)``: Madry et al.'s adversarial training, and the Free paper's."""

    name = "ce"

    def __call__(self, adversarial: Tensor, y: Tensor, clean: Tensor | None = None) -> Tensor:
        return F.cross_entropy(adversarial, y)


class TRADES(TrainingLoss):
    """TRADES (Zhang et al., ICML 2019): ``CE(f(x), y) + β · KL(f(x) ‖ f(x_adv))``, the KL between the clean and the
    adversarial class probabilities summed over classes and averaged over the batch, as in the authors' ``trades.py``.
    The attack maximises the KL term alone, against the clean probabilities held fixed.

    Args:
        beta: β, the weight of the robustness term (the authors' 6; 0 is natural training on the clean images).

    Example:
        >>> import torch
        >>> logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> abs(TRADES(beta=6.0)(logits, y, clean=logits) - F.cross_entropy(logits, y)).item() < 1e-6  # no KL term
        True
    """

    name = "trades"
    needs_clean = True

    def __init__(self, beta: float = 6.0) -> None:
        self.beta = _check_beta(beta)

    def __call__(self, adversarial: Tensor, y: Tensor, clean: Tensor | None = None) -> Tensor:
        if clean is None:
            raise ValueError("TRADES needs the clean logits: pass clean=model(x)")
        return F.cross_entropy(clean, y) + self.beta * _kl(adversarial, clean) / adversarial.shape[0]

    def attack_loss(self, clean: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        if clean is None:
            raise ValueError("TRADES's attack needs the clean logits: pass clean=model(x)")
        target = clean.detach()
        return lambda logits, y: _kl(logits, target)

    def describe(self) -> str:
        return f"TRADES (β = {self.beta:g})"


def _kl(adversarial: Tensor, clean: Tensor) -> Tensor:
    """KL(p_clean ‖ p_adv) summed over classes and examples (``KLDivLoss(reduction="sum")``, the authors')."""
    return F.kl_div(F.log_softmax(adversarial, dim=1), F.softmax(clean, dim=1), reduction="sum")


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"trades_beta must be a finite number ≥ 0 (the TRADES authors' is 6.0), got {beta!r}")
    if not (0 <= beta < math.inf):
        raise ValueError(
            f"trades_beta must be a finite number ≥ 0, got {beta!r}: it weighs the KL term of TRADES; use the "
            "authors' 6.0 (larger: more robust, less accurate)"
        )
    return float(beta)


def training_loss(loss: str | TrainingLoss = "ce", trades_beta: float = 6.0) -> TrainingLoss:
    """The training loss named ``loss`` (``"ce"`` or ``"trades"`` with β = ``trades_beta``), or ``loss`` itself if it
    already is a :class:`TrainingLoss`.

    Example:
        >>> training_loss("trades", trades_beta=1.0).describe()
        'TRADES (β = 1)'
    """
    beta = _check_beta(trades_beta)
    if isinstance(loss, TrainingLoss):
        return loss
    if not isinstance(loss, str):
        raise TypeError(f"loss must be 'ce', 'trades' or a freeadv_pl.losses.TrainingLoss, got {loss!r}")
    return TRADES(beta) if check_choice(loss, "loss", ("ce", "trades")) == "trades" else CrossEntropy()
