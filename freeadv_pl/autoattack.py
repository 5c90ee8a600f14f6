"""AutoAttack (Croce & Hein, ICML 2020) on torchattacks' attacks, with the official settings, in the L∞ or the L2
threat model (pure PyTorch).

torchattacks is an optional extra: ``pip install "freeadv_pl[autoattack]"``. This module imports it only when an
attack runs or :meth:`AutoAttackSpec.ensure_available` is called.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model

__all__ = ["AutoAttackSpec"]

_INSTALL = 'pip install "freeadv_pl[autoattack]" (or pip install torchattacks)'
_MIN_CLASSES = {"standard": 4, "apgd": 3}  # APGD-T's targeted DLR loss reads the 4th-largest logit, DLR the 3rd
_warned_targets: set[int] = set()


@dataclass(frozen=True)
class AutoAttackSpec:
    """AutoAttack as one column of an evaluation suite: attacks in the ``norm``'s threat model run one after another,
    each on the examples that every earlier one left unbroken; an example counts as robust only if it is classified
    correctly clean and no attack breaks it.

    ``version="standard"`` is AutoAttack's standard version with its official parameters: APGD-CE (100 steps,
    1 restart, ρ = 0.75), APGD-T (targeted DLR loss, 9 target classes, 100 steps), FAB-T (9 target classes,
    100 steps, α_max = 0.1, η = 1.05, β = 0.9) and Square (5,000 queries, p_init = 0.8), each built from
    torchattacks' own class, in L∞ (torchattacks' ``norm="Linf"``) or L2 (``norm="L2"``: the standard version
    runs the same four attacks in both); with C < 10 classes APGD-T and FAB-T target the C − 1 others (a warning
    says so).
    ``version="apgd"`` is APGD-CE then APGD-DLR, a cheaper check for the end of each epoch. Only a verified
    misclassification counts (each candidate is projected onto the ε-ball and [0, 1] and classified again). Each run
    happens inside ``torch.random.fork_rng`` seeded from ``generator``, so training's random state is kept.

    Args:
        version: ``"standard"`` or ``"apgd"``.
        steps: iterations of APGD and FAB (the official 100).
        queries: Square's query budget (the official 5,000).
        restarts: restarts of each attack (the standard version's 1).
        epsilon: radius in pixel units (at most 1 in L∞, any finite number ≥ 0 in L2); None: the evaluation's ε
            (the training module's).
        name: key of the logged metric; None: ``autoattack`` or ``apgd``, with the norm outside L∞
            (``autoattack_l2``).
        norm: ``"linf"`` or ``"l2"``; None: the evaluation's norm (the training module's ``norm``), set by
            :meth:`resolved`. Until then the attack is named and run in L∞.

    Example:
        >>> spec = AutoAttackSpec()
        >>> spec.key, spec.title
        ('autoattack', 'AutoAttack')
        >>> AutoAttackSpec(version="apgd").describe(8 / 255)
        'APGD-CE, then APGD-DLR (torchattacks; L∞ ε = 8/255; 100 steps, 1 restart each; each on what the earlier left)'
        >>> spec = AutoAttackSpec(norm="l2")
        >>> spec.key, spec.title
        ('autoattack_l2', 'AutoAttack (L2)')
    """

    version: Literal["standard", "apgd"] = "standard"
    steps: int = 100
    queries: int = 5000
    restarts: int = 1
    epsilon: float | str | None = None
    name: str | None = None
    norm: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.version, "version", ("standard", "apgd"))
        check_int(self.steps, "steps", minimum=1)
        check_int(self.queries, "queries", minimum=1)
        check_int(self.restarts, "restarts", minimum=1)
        if self.norm is not None:
            threat_model(self.norm)
        if self.epsilon is not None:
            check_radius(self.epsilon, "epsilon", self.norm)

    @property
    def threat(self) -> ThreatModel:
        """The threat model of ``norm`` (L∞'s while unresolved)."""
        return threat_model(self.norm or "linf")

    def resolved(self, norm: str | ThreatModel) -> AutoAttackSpec:
        """This attack in ``norm``'s threat model if it names no norm itself (ε checked against it); itself
        otherwise."""
        return self if self.norm is not None else dataclasses.replace(self, norm=threat_model(norm).norm)

    @property
    def key(self) -> str:
        """The name under which the accuracy is logged (``val/robust/<key>``)."""
        return self.name or self.threat.key("autoattack" if self.version == "standard" else "apgd")

    @property
    def title(self) -> str:
        """The column's title: ``AutoAttack`` or ``APGD-CE+DLR``, with the norm outside L∞."""
        return self.threat.title("AutoAttack" if self.version == "standard" else "APGD-CE+DLR")

    def epsilon_for(self, default: float) -> float:
        """The radius this attack runs at: its own ``epsilon``, else ``default``."""
        return default if self.epsilon is None else check_radius(self.epsilon, "epsilon", self.norm)

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        """Everything that defines the number: the attacks, their parameters, the norm and ε, and the order they
        run in."""
        radius = self.threat.describe(self.epsilon_for(epsilon))
        each = f"{self.steps} steps, {self.restarts} restart{'s' if self.restarts > 1 else ''} each"
        if self.version == "apgd":
            return f"APGD-CE, then APGD-DLR (torchattacks; {radius}; {each}; each on what the earlier left)"
        targets = _targets(num_classes)
        return (
            f"AutoAttack, standard version (Croce & Hein 2020, on torchattacks): APGD-CE, APGD-T ({targets} target "
            f"classes), FAB-T ({targets} target classes), Square ({self.queries:,} queries); {radius}; {each}; "
            "each on what the earlier left"
        )

    @staticmethod
    def ensure_available() -> None:
        """Raise ``ModuleNotFoundError`` naming the extra when torchattacks is not installed."""
        if importlib.util.find_spec("torchattacks") is None:
            raise ModuleNotFoundError(f"the AutoAttack presets run on torchattacks, which is not installed: {_INSTALL}")

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """The adversarial images: for each example, the first verified adversarial example the suite found, or the
        clean image when none did (or when it is misclassified clean).

        Raises:
            ModuleNotFoundError: without torchattacks.
            ValueError: when the model has fewer classes than the attacks' losses need (4 for the standard
                version, 3 for ``"apgd"``).
        """
        self.ensure_available()
        threat = self.threat
        epsilon = threat.radius(self.epsilon_for(epsilon), "epsilon")
        device = x.device
        draw_on = generator.device if generator is not None else None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=draw_on))
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with (
            temporary_mode(model, training=False),
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.random.fork_rng(devices=cuda),
        ):
            x, y = x.detach().clone(), y.detach().clone()
            x_adv = x.clone()
            with torch.no_grad():
                logits = model(x)
                robust = logits.argmax(dim=1) == y
            for number, build in enumerate(self._attacks(logits.shape[1])):
                index = robust.nonzero().squeeze(1)
                if index.numel() == 0:
                    break
                attack = build(model, epsilon, seed + number)
                found = attack(x[index], y[index]).to(device, x.dtype)
                candidate = threat.project_images(found, x[index], epsilon)  # verified inside the ball and [0, 1]
                with torch.no_grad():
                    broken = model(candidate).argmax(dim=1) != y[index]
                x_adv[index[broken]] = candidate[broken]
                robust[index[broken]] = False
        return x_adv

    def _attacks(self, num_classes: int) -> list[Any]:
        """Factories ``(model, ε, seed) -> torchattacks attack``, in the order they run."""
        import torchattacks

        needed = _MIN_CLASSES[self.version]
        if num_classes < needed:
            raise ValueError(
                f"{self.title} needs a model with at least {needed} classes (its DLR loss divides by a gap between "
                f"sorted logits), got {num_classes}: evaluate with PGD and CW instead, e.g. test_attacks='pgd20' or "
                "a list of AttackSpec(loss='cw')."
            )
        norm = self.threat.torchattacks_norm
        common = {"norm": norm, "steps": self.steps, "n_restarts": self.restarts}
        apgd = {**common, "eot_iter": 1, "rho": 0.75}

        def apgd_ce(model: nn.Module, epsilon: float, seed: int) -> Any:
            return torchattacks.APGD(model, eps=epsilon, seed=seed, loss="ce", **apgd)

        if self.version == "apgd":

            def apgd_dlr(model: nn.Module, epsilon: float, seed: int) -> Any:
                return torchattacks.APGD(model, eps=epsilon, seed=seed, loss="dlr", **apgd)

            return [apgd_ce, apgd_dlr]
        classes = min(num_classes, 10)  # torchattacks targets n_classes − 1 classes; the official code 9
        if num_classes < 10 and num_classes not in _warned_targets:
            _warned_targets.add(num_classes)
            warnings.warn(
                f"AutoAttack: the model has {num_classes} classes, so APGD-T and FAB-T target the {num_classes - 1} "
                "other classes (the standard version's 9 need 10 classes).",
                stacklevel=3,
            )

        def apgd_t(model: nn.Module, epsilon: float, seed: int) -> Any:
            return torchattacks.APGDT(model, eps=epsilon, seed=seed, n_classes=classes, **apgd)

        def fab_t(model: nn.Module, epsilon: float, seed: int) -> Any:
            fab = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "multi_targeted": True}
            return torchattacks.FAB(model, eps=epsilon, seed=seed, n_classes=classes, **common, **fab)

        def square(model: nn.Module, epsilon: float, seed: int) -> Any:
            return torchattacks.Square(
                model,
                norm=norm,
                eps=epsilon,
                n_queries=self.queries,
                n_restarts=self.restarts,
                p_init=0.8,
                loss="margin",
                resc_schedule=True,
                seed=seed,
            )

        return [apgd_ce, apgd_t, fab_t, square]


def _targets(num_classes: int) -> int:
    """APGD-T's and FAB-T's number of target classes for a model with ``num_classes`` classes."""
    return min(num_classes, 10) - 1
