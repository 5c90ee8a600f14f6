"""AutoAttack (Croce & Hein, ICML 2020) on torchattacks' attacks, with the official settings (pure PyTorch).

torchattacks is an optional extra: ``pip install "freeadv_pl[autoattack]"``. This module imports it only when an
attack runs or :meth:`AutoAttackSpec.ensure_available` is called.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.threat_models import threat_model

__all__ = ["AutoAttackSpec"]

_INSTALL = 'pip install "freeadv_pl[autoattack]" (or pip install torchattacks)'
_MIN_CLASSES = {"standard": 4, "apgd": 3}  # APGD-T's targeted DLR loss reads the 4th-largest logit, DLR the 3rd
_warned_targets: set[int] = set()


@dataclass(frozen=True)
class AutoAttackSpec:
    """AutoAttack as one column of an evaluation suite: L∞ attacks run one after another, each on the examples that
    every earlier one left unbroken; an example counts as robust only if it is classified correctly clean and no
    attack breaks it.

    ``version="standard"`` is AutoAttack's standard version with its official parameters: APGD-CE (100 steps,
    1 restart, ρ = 0.75), APGD-T (targeted DLR loss, 9 target classes, 100 steps), FAB-T (9 target classes,
    100 steps, α_max = 0.1, η = 1.05, β = 0.9) and Square (5,000 queries, p_init = 0.8), each built from
    torchattacks' own class; with C < 10 classes APGD-T and FAB-T target the C − 1 others (a warning says so).
    ``version="apgd"`` is APGD-CE then APGD-DLR, a cheaper check for the end of each epoch. Only a verified
    misclassification counts (each candidate is projected onto the ε-ball and [0, 1] and classified again). Each run
    happens inside ``torch.random.fork_rng`` seeded from ``generator``, so training's random state is kept.

    Args:
        version: ``"standard"`` or ``"apgd"``.
        steps: iterations of APGD and FAB (the official 100).
        queries: Square's query budget (the official 5,000).
        restarts: restarts of each attack (the standard version's 1).
        epsilon: radius in pixel units; None: the evaluation's ε (the training module's).
        name: key of the logged metric; None: ``autoattack`` or ``apgd``.

    Example:
        >>> spec = AutoAttackSpec()
        >>> spec.key, spec.title
        ('autoattack', 'AutoAttack')
        >>> AutoAttackSpec(version="apgd").describe(8 / 255)
        'APGD-CE, then APGD-DLR (torchattacks; L∞ ε = 8/255; 100 steps, 1 restart each; each on what the earlier left)'
    """

    version: Literal["standard", "apgd"] = "standard"
    steps: int = 100
    queries: int = 5000
    restarts: int = 1
    epsilon: float | str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.version, "version", ("standard", "apgd"))
        check_int(self.steps, "steps", minimum=1)
        check_int(self.queries, "queries", minimum=1)
        check_int(self.restarts, "restarts", minimum=1)
        if self.epsilon is not None:
            as_pixel_fraction(self.epsilon, "epsilon")

    @property
    def key(self) -> str:
        """The name under which the accuracy is logged (``val/robust/<key>``)."""
        return self.name or ("autoattack" if self.version == "standard" else "apgd")

    @property
    def title(self) -> str:
        return "AutoAttack" if self.version == "standard" else "APGD-CE+DLR"

    def epsilon_for(self, default: float) -> float:
        return default if self.epsilon is None else as_pixel_fraction(self.epsilon, "epsilon")

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        """Everything that defines the number: the attacks, their parameters, ε, and the order they run in."""
        from freeadv_pl.evaluation import _pixels  # one formatting of pixel values; evaluation imports this module

        epsilon = self.epsilon_for(epsilon)
        each = f"{self.steps} steps, {self.restarts} restart{'s' if self.restarts > 1 else ''} each"
        if self.version == "apgd":
            return (
                f"APGD-CE, then APGD-DLR (torchattacks; L∞ ε = {_pixels(epsilon)}; {each}; each on what the earlier "
                "left)"
            )
        targets = _targets(num_classes)
        return (
            f"AutoAttack, standard version (Croce & Hein 2020, on torchattacks): APGD-CE, APGD-T ({targets} target "
            f"classes), FAB-T ({targets} target classes), Square ({self.queries:,} queries); L∞ ε = "
            f"{_pixels(epsilon)}; {each}; each on what the earlier left"
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
        epsilon = self.epsilon_for(epsilon)
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
                candidate = threat_model("linf").project_images(attack(x[index], y[index]).to(device, x.dtype), x[index], epsilon)
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
        common = {"norm": "Linf", "steps": self.steps, "n_restarts": self.restarts}
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
                norm="Linf",
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
