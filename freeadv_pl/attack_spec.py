"""One attack of an evaluation suite, fully described: natural accuracy, PGD-k or CW-k, in the L∞ or the L2 threat
model (pure PyTorch, no Lightning). AutoAttack's column is :class:`~freeadv_pl.AutoAttackSpec`; both are
:class:`~freeadv_pl.evaluation.EvaluationAttack` objects."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl.attacks import ModelMode, pgd
from freeadv_pl.threat_models import ThreatModel, check_radius, format_pixels, threat_model

__all__ = ["AttackSpec"]


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation suite, fully described (docs/design.md, "Honest evaluation").

    ``steps=0`` is natural (clean) accuracy. Otherwise PGD (:func:`~freeadv_pl.pgd`) in the ``norm``'s threat model
    on the ``loss`` (``"cw"``: PGD on the CW margin, the paper's CW-k): ``steps`` steps of ``step_size``,
    ``restarts`` random starts (per-example worst case).

    Args:
        steps: number of PGD steps; 0 for natural accuracy.
        loss: ``"ce"`` or ``"cw"``.
        step_size: step in pixel units (float or ``"2/255"``); None: ε/4 in either norm (2/255 at L∞ ε = 8/255,
            0.125 at L2 ε = 0.5).
        restarts: number of random starts.
        epsilon: radius in pixel units (at most 1 in L∞, any finite number ≥ 0 in L2); None: the evaluation's ε
            (the training module's).
        random_start: start from the norm's random start (δ ~ U(-ε, ε) in L∞; in L2 a random direction at a radius
            uniform in [0, ε]), otherwise from δ = 0.
        name: key of the logged metric; None: derived, e.g. ``pgd20``, ``cw100``, ``pgd20x10``, ``natural``, with
            the norm outside L∞: ``pgd20_l2``.
        norm: ``"linf"`` or ``"l2"``; None: the evaluation's norm (the training module's ``norm``), set by
            :meth:`resolved`. Until then the attack is named and run in L∞.

    Example:
        >>> AttackSpec(steps=20, restarts=10).describe(8 / 255)
        'PGD-20 (CE loss, ε = 8/255, step 2/255, 10 random restarts)'
        >>> AttackSpec(steps=20, restarts=10).key
        'pgd20x10'
        >>> spec = AttackSpec(steps=20).resolved("l2")
        >>> spec.key, spec.title, spec.describe(0.5)
        ('pgd20_l2', 'PGD-20 (L2)', 'PGD-20 (CE loss, L2 ε = 0.5, step 0.125, 1 random start)')
    """

    steps: int = 20
    loss: Literal["ce", "cw"] = "ce"
    step_size: float | str | None = None
    restarts: int = 1
    epsilon: float | str | None = None
    random_start: bool = True
    name: str | None = None
    norm: str | None = None

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", minimum=0)
        check_choice(self.loss, "loss", ("ce", "cw"))
        check_int(self.restarts, "restarts", minimum=1)
        if self.norm is not None:
            threat_model(self.norm)
        if self.step_size is not None:
            check_radius(self.step_size, "step_size", self.norm, allow_zero=False)
        if self.epsilon is not None:
            check_radius(self.epsilon, "epsilon", self.norm)

    @property
    def threat(self) -> ThreatModel:
        """The threat model of ``norm`` (L∞'s while unresolved)."""
        return threat_model(self.norm or "linf")

    @property
    def perturbs(self) -> bool:
        """False for natural accuracy (``steps=0``), which needs no ε."""
        return self.steps > 0

    def resolved(self, norm: str | ThreatModel) -> AttackSpec:
        """This attack in ``norm``'s threat model if it names no norm itself (ε and step size checked against it);
        itself otherwise."""
        return self if self.norm is not None else dataclasses.replace(self, norm=threat_model(norm).norm)

    @property
    def key(self) -> str:
        """The name under which the accuracy is logged (``val/robust/<key>``)."""
        if self.name:
            return self.name
        if self.steps == 0:
            return "natural"
        key = f"{self.loss if self.loss == 'cw' else 'pgd'}{self.steps}"
        return self.threat.key(key + (f"x{self.restarts}" if self.restarts > 1 else ""))

    @property
    def title(self) -> str:
        """A column title in the paper's style: ``natural``, ``PGD-20``, ``CW-100``, ``10-restart PGD-20``, with the
        norm outside L∞: ``PGD-20 (L2)``."""
        if self.steps == 0:
            return "natural"
        return self.threat.title(f"{self.restarts}-restart {self._attack}" if self.restarts > 1 else self._attack)

    @property
    def _attack(self) -> str:
        return f"{'CW' if self.loss == 'cw' else 'PGD'}-{self.steps}"

    def epsilon_for(self, default: float) -> float:
        """The radius this attack runs at: its own ``epsilon``, else ``default``."""
        return default if self.epsilon is None else check_radius(self.epsilon, "epsilon", self.norm)

    def step_size_for(self, epsilon: float) -> float:
        """The step size at radius ``epsilon``: its own ``step_size``, else ε/4."""
        if self.step_size is None:
            return epsilon / 4
        return check_radius(self.step_size, "step_size", self.norm, allow_zero=False)

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        """Everything that defines the number: attack, loss, norm and ε, step, restarts and start (for any
        ``num_classes``)."""
        if self.steps == 0:
            return "natural (clean images)"
        epsilon = self.epsilon_for(epsilon)
        start = (
            f"{self.restarts} random restarts"
            if self.restarts > 1
            else ("1 random start" if self.random_start else "start at δ = 0")
        )
        return (
            f"{self._attack} ({self.loss.upper()} loss, {self.threat.label(epsilon)}, "
            f"step {format_pixels(self.step_size_for(epsilon))}, {start})"
        )

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        epsilon: float,
        generator: torch.Generator | None = None,
        model_mode: ModelMode = "eval",
    ) -> Tensor:
        """The adversarial images (``x`` itself for natural accuracy), the model in ``model_mode`` meanwhile."""
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
            model_mode=model_mode,
            generator=generator,
            norm=self.threat,
        )
