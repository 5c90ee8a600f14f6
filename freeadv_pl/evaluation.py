"""Accuracy of a model on a dataset, clean or under an attack, and the paper's attack suites (pure PyTorch, no
Lightning)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import pgd
from freeadv_pl.autoattack import AutoAttackSpec

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""Maps (model, images, labels) to adversarial images, e.g. ``functools.partial(pgd, epsilon=0.1, ...)``."""


def count_correct(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], attack: Attack | None = None
) -> tuple[int, int]:
    """Count the examples ``model`` classifies correctly, on clean inputs or on ``attack``'s adversarial ones.

    The model runs in evaluation mode (its modes are restored afterwards), on the device of its parameters.

    Args:
        model: maps images in [0, 1] to logits.
        batches: ``(images, labels)`` pairs, e.g. a DataLoader.
        attack: None for clean accuracy, otherwise a function returning adversarial images.

    Returns:
        ``(correct, total)``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> count_correct(model, [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))])[1]
        3
    """
    device = next(model.parameters()).device
    correct = total = 0
    with temporary_mode(model, training=False):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct, total


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation suite, fully described (docs/design.md, "Honest evaluation").

    ``steps=0`` is natural (clean) accuracy. Otherwise L∞ PGD on the ``loss`` (``"cw"``: PGD on the CW margin, the
    paper's CW-k), ``steps`` steps of ``step_size``, ``restarts`` random starts (per-example worst case).

    Args:
        steps: number of PGD steps; 0 for natural accuracy.
        loss: ``"ce"`` or ``"cw"``.
        step_size: step in pixel units (float or ``"2/255"``); None: ε/4 (2/255 at ε = 8/255).
        restarts: number of random starts.
        epsilon: radius in pixel units; None: the evaluation's ε (the training module's).
        random_start: start from δ ~ U(-ε, ε) (otherwise from δ = 0).
        name: key of the logged metric; None: derived, e.g. ``pgd20``, ``cw100``, ``pgd20x10``, ``natural``.

    Example:
        >>> AttackSpec(steps=20, restarts=10).describe(8 / 255)
        'PGD-20 (CE loss, ε = 8/255, step 2/255, 10 random restarts)'
        >>> AttackSpec(steps=20, restarts=10).key
        'pgd20x10'
    """

    steps: int = 20
    loss: Literal["ce", "cw"] = "ce"
    step_size: float | str | None = None
    restarts: int = 1
    epsilon: float | str | None = None
    random_start: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", minimum=0)
        check_choice(self.loss, "loss", ("ce", "cw"))
        check_int(self.restarts, "restarts", minimum=1)
        if self.step_size is not None:
            as_pixel_fraction(self.step_size, "step_size", allow_zero=False)
        if self.epsilon is not None:
            as_pixel_fraction(self.epsilon, "epsilon")

    @property
    def key(self) -> str:
        """The name under which the accuracy is logged (``val/robust/<key>``)."""
        if self.name:
            return self.name
        if self.steps == 0:
            return "natural"
        return f"{self.loss if self.loss == 'cw' else 'pgd'}{self.steps}" + (
            f"x{self.restarts}" if self.restarts > 1 else ""
        )

    @property
    def title(self) -> str:
        """A column title in the paper's style: ``natural``, ``PGD-20``, ``CW-100``, ``10-restart PGD-20``."""
        if self.steps == 0:
            return "natural"
        title = f"{'CW' if self.loss == 'cw' else 'PGD'}-{self.steps}"
        return f"{self.restarts}-restart {title}" if self.restarts > 1 else title

    def epsilon_for(self, default: float) -> float:
        return default if self.epsilon is None else as_pixel_fraction(self.epsilon, "epsilon")

    def step_size_for(self, epsilon: float) -> float:
        return epsilon / 4 if self.step_size is None else as_pixel_fraction(self.step_size, "step_size")

    def describe(self, epsilon: float) -> str:
        """Everything that defines the number: attack, loss, ε, step, restarts and start."""
        if self.steps == 0:
            return "natural (clean images)"
        epsilon = self.epsilon_for(epsilon)
        start = (
            f"{self.restarts} random restarts"
            if self.restarts > 1
            else ("1 random start" if self.random_start else "start at δ = 0")
        )
        return (
            f"{self.title.split()[-1]} ({self.loss.upper()} loss, ε = {_pixels(epsilon)}, "
            f"step {_pixels(self.step_size_for(epsilon))}, {start})"
        )

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """The adversarial images (``x`` itself for natural accuracy)."""
        if self.steps == 0:
            return x
        epsilon = self.epsilon_for(epsilon)
        return pgd(
            model,
            x,
            y,
            epsilon=epsilon,
            step_size=self.step_size_for(epsilon),
            steps=self.steps,
            restarts=self.restarts,
            loss=self.loss,
            random_start=self.random_start,
            generator=generator,
        )


def _pixels(value: float) -> str:
    """``8/255`` for whole multiples of 1/255 (up to rounding), the decimal otherwise."""
    levels = round(value * 255)
    return f"{levels}/255" if abs(levels - value * 255) < 1e-6 else f"{value:g}"


SuiteAttack = AttackSpec | AutoAttackSpec
"""One column of an evaluation suite."""

ATTACK_PRESETS: dict[str, tuple[SuiteAttack, ...]] = {
    # The paper's CIFAR evaluation (ε = 8/255, step 2/255).
    "cifar": (
        AttackSpec(steps=0),
        AttackSpec(steps=20, step_size="2/255"),
        AttackSpec(steps=100, step_size="2/255"),
        AttackSpec(steps=100, loss="cw", step_size="2/255"),
        AttackSpec(steps=20, step_size="2/255", restarts=10),
    ),
    # The paper's ImageNet evaluation (step 1/255).
    "imagenet": (
        AttackSpec(steps=0),
        AttackSpec(steps=10, step_size="1/255"),
        AttackSpec(steps=50, step_size="1/255"),
        AttackSpec(steps=100, step_size="1/255"),
    ),
    # A cheap check during training: natural and PGD-20 (step ε/4).
    "pgd20": (AttackSpec(steps=0), AttackSpec(steps=20)),
    # RobustBench's number: AutoAttack's standard version, beside PGD-20 (step ε/4) for the gradient-masking check.
    "autoattack": (AttackSpec(steps=0), AttackSpec(steps=20), AutoAttackSpec()),
    # A cheaper AutoAttack-style check for the end of each epoch: APGD-CE, then APGD-DLR.
    "apgd": (AttackSpec(steps=0), AutoAttackSpec(version="apgd")),
}
"""Attack suites by name, for ``RobustEvaluation(attacks="cifar")``."""
