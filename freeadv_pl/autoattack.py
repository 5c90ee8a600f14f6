"""AutoAttack (Croce & Hein, ICML 2020) as one column of an evaluation suite, in the L∞ or the L2 threat model, run by
the official code (PyPI's ``pyautoattack``, the default) or by torchattacks' port of its attacks (pure PyTorch).

Both are optional: ``pip install "freeadv_pl[autoattack]"``. This module imports them only when an attack runs or
:meth:`AutoAttackSpec.ensure_available` is called.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from freeadv_pl._autoattack_batch import AutoAttackResult, attack_batch, collapsed_flags, target_classes
from freeadv_pl._checks import check_choice, check_int
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model

__all__ = ["AutoAttackResult", "AutoAttackSpec", "AutoAttackWarning"]

IMPLEMENTATIONS = ("official", "torchattacks")
# implementation: (its package, import and distribution name alike; the requirement the `autoattack` extra pins)
_PACKAGES = {
    "official": ("pyautoattack", "pyautoattack>=0.2,<0.3"),
    "torchattacks": ("torchattacks", "torchattacks>=3.5.1,<3.6"),
}


class AutoAttackWarning(UserWarning):
    """A check of AutoAttack's failed on a batch: the message names the implementation, the attack and the check."""


@dataclass(frozen=True)
class AutoAttackSpec:
    """AutoAttack as one column of an evaluation suite: attacks in the ``norm``'s threat model run one after another,
    each on the examples that every earlier one left unbroken; an example counts as robust only if it is classified
    correctly clean and no attack breaks it.

    ``implementation="official"`` (the default) runs Croce & Hein's own code, ``pyautoattack.AutoAttack``, as
    RobustBench does; ``"torchattacks"`` runs torchattacks' port of the four attacks, one class at a time, with the
    same parameters. Both check their result as the official code does and report what fails as flags: the
    official code's checks (a randomized or dynamic defense, outputs that look like probabilities, zero gradients,
    Square breaking what the gradient attacks left: its own words), torchattacks' only the last (the official rule:
    Square lowers the batch's robust accuracy by more than 0.2 %). Each flag is emitted as an
    :class:`AutoAttackWarning` naming the code and the attack, and kept in :attr:`flags` (see :meth:`take_flags`)
    and in :meth:`run`'s result.

    ``version="standard"`` is AutoAttack's standard version with its official parameters: APGD-CE (100 steps,
    1 restart, ρ = 0.75), APGD-T (targeted DLR loss, 9 target classes, 100 steps), FAB-T (9 target classes,
    100 steps, α_max = 0.1, η = 1.05, β = 0.9) and Square (5,000 queries, p_init = 0.8), in L∞ (the official
    ``norm="Linf"``) or L2 (``norm="L2"``: the standard version runs the same four attacks in both); with C < 10
    classes APGD-T and FAB-T target the C − 1 others (a warning says so).
    ``version="apgd"`` is APGD-CE then APGD-DLR, a cheaper check for the end of each epoch. Only a verified
    misclassification counts (each candidate is projected onto the ε-ball and [0, 1] and classified again). Each run
    happens inside ``torch.random.fork_rng``, every attack seeded with one number drawn from ``generator``, so a run
    is deterministic given the generator's seed and training's random state is kept; the model's parameters get no
    gradient (FAB's backward passes would leave one).

    Args:
        version: ``"standard"`` or ``"apgd"``.
        steps: iterations of APGD and FAB (the official 100).
        queries: Square's query budget (the official 5,000).
        restarts: restarts of each attack (the standard version's 1; the official code runs FAB-T with 1 always).
        epsilon: radius in pixel units (at most 1 in L∞, any finite number ≥ 0 in L2); None: the evaluation's ε
            (the training module's).
        name: key of the logged metric; None: ``autoattack`` or ``apgd``, with the norm outside L∞
            (``autoattack_l2``), whichever the implementation.
        norm: ``"linf"`` or ``"l2"``; None: the evaluation's norm (the training module's ``norm``), set by
            :meth:`resolved`. Until then the attack is named and run in L∞.
        implementation: ``"official"`` (``pip install pyautoattack``) or ``"torchattacks"``
            (``pip install torchattacks``); the ``autoattack`` extra installs both.
        verbose: print the attacks' progress (the official code's log, torchattacks' own prints).

    Raises:
        ValueError: on an unknown version, norm or implementation, a count < 1 or an ε outside the norm's range.

    Example:
        >>> spec = AutoAttackSpec()
        >>> spec.key, spec.title, spec.implementation
        ('autoattack', 'AutoAttack', 'official')
        >>> print(AutoAttackSpec(version="apgd").describe(8 / 255))  # doctest: +ELLIPSIS
        APGD-CE, then APGD-DLR (the official code, pyautoattack ...; L∞ ε = 8/255; 100 steps, 1 restart each; each on what the earlier left)
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
    implementation: Literal["official", "torchattacks"] = "official"
    verbose: bool = False
    flags: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice(self.version, "version", ("standard", "apgd"))
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be 'official' (Croce & Hein's code, pyautoattack) or 'torchattacks' (its port), "
                f"got {self.implementation!r}"
            )
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
        otherwise. The two keep one list of :attr:`flags`: the spec a suite was given reports the resolved one's."""
        if self.norm is not None:
            return self
        copy = dataclasses.replace(self, norm=threat_model(norm).norm)
        object.__setattr__(copy, "flags", self.flags)  # frozen: set as the dataclass itself sets fields
        return copy

    @property
    def key(self) -> str:
        """The name under which the accuracy is logged (``val/robust/<key>``)."""
        return self.name or self.threat.key("autoattack" if self.version == "standard" else "apgd")

    @property
    def title(self) -> str:
        """The column's title: ``AutoAttack`` or ``APGD-CE+DLR``, with the norm outside L∞."""
        return self.threat.title("AutoAttack" if self.version == "standard" else "APGD-CE+DLR")

    @property
    def code(self) -> str:
        """The code that runs the attacks and its version, e.g. ``"pyautoattack 0.2.0"`` (``"pyautoattack, not
        installed"``)."""
        package, _ = _PACKAGES[self.implementation]
        try:
            return f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{package}, not installed"

    def epsilon_for(self, default: float) -> float:
        """The radius this attack runs at: its own ``epsilon``, else ``default``."""
        return default if self.epsilon is None else check_radius(self.epsilon, "epsilon", self.norm)

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        """Everything that defines the number: the code that ran, the attacks, their parameters, the norm and ε, and
        the order they run in."""
        radius = self.threat.describe(self.epsilon_for(epsilon))
        each = f"{self.steps} steps, {self.restarts} restart{'s' if self.restarts > 1 else ''} each"
        code = f"the official code, {self.code}" if self.implementation == "official" else f"{self.code}'s port"
        if self.version == "apgd":
            return f"APGD-CE, then APGD-DLR ({code}; {radius}; {each}; each on what the earlier left)"
        targets = target_classes(num_classes)
        return (
            f"AutoAttack, standard version (Croce & Hein 2020; {code}): APGD-CE, APGD-T ({targets} target classes), "
            f"FAB-T ({targets} target classes), Square ({self.queries:,} queries); {radius}; {each}; each on what "
            "the earlier left"
        )

    def ensure_available(self: AutoAttackSpec | None = None) -> None:
        """Raise ``ModuleNotFoundError`` naming the pip command when the implementation's package is not installed
        (called on the class, ``AutoAttackSpec.ensure_available()``: the default implementation's)."""
        implementation = "official" if self is None else self.implementation
        package, requirement = _PACKAGES[implementation]
        if importlib.util.find_spec(package) is None:
            other = "torchattacks" if implementation == "official" else "official"
            raise ModuleNotFoundError(
                f"AutoAttackSpec(implementation={implementation!r}) runs on {package}, which is not installed: "
                f'pip install "freeadv_pl[autoattack]" (or pip install "{requirement}"), or use '
                f"AutoAttackSpec(implementation={other!r})"
            )

    def take_flags(self) -> list[tuple[str, str]]:
        """The ``(attack, message)`` flags of every call since the last ``take_flags``, emptied."""
        taken = list(self.flags)
        self.flags.clear()
        return taken

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None = None
    ) -> Tensor:
        """The adversarial images of :meth:`run`. Its flags are emitted as :class:`AutoAttackWarning` and kept in
        :attr:`flags`, one per attack and check (the official code repeats some for each target class)."""
        result = self.run(model, x, y, epsilon, generator)
        flags = collapsed_flags(result.flags)
        for attack, message in flags:
            warnings.warn(f"AutoAttack ({result.code}), {attack}: {message}", AutoAttackWarning, stacklevel=2)
        self.flags.extend(flags)
        return result.images

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None = None
    ) -> AutoAttackResult:
        """Attack ``x`` (labels ``y``) on ``model``'s device at the radius ``epsilon`` (the spec's own ε wins), every
        attack seeded with a number drawn from ``generator``.

        Raises:
            ModuleNotFoundError: without the implementation's package.
            ValueError: when the model has fewer classes than the attacks' losses need (4 for the standard
                version, 3 for ``"apgd"``).
        """
        self.ensure_available()
        return attack_batch(self, model, x, y, self.threat.radius(self.epsilon_for(epsilon), "epsilon"), generator)


def take_autoattack_flags(suite: Any) -> list[dict[str, str]]:
    """The flags of the AutoAttack columns of ``suite`` (any sequence of attacks) since they were last taken, as
    ``{"attack": column key, "stage": attack that raised it, "message": ...}``, emptied: what a report records
    beside the figures. Take them once before counting, to drop a shared preset's earlier flags."""
    return [
        {"attack": attack.key, "stage": stage, "message": message}
        for attack in suite
        if isinstance(attack, AutoAttackSpec)
        for stage, message in attack.take_flags()
    ]
