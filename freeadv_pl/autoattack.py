"""AutoAttack (Croce & Hein, ICML 2020) as one column of an evaluation suite, in the L∞ or the L2 threat model, run by
the official code (PyPI's ``pyautoattack``, the default) or by torchattacks' port of its attacks (pure PyTorch).

Both are optional: ``pip install "freeadv_pl[autoattack]"``. This module imports them only when an attack runs or
:meth:`AutoAttackSpec.ensure_available` is called.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl._official_autoattack import run_official
from freeadv_pl._torchattacks_autoattack import run_torchattacks
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model

__all__ = ["AutoAttackResult", "AutoAttackSpec", "AutoAttackWarning"]

IMPLEMENTATIONS = ("official", "torchattacks")
# implementation: (its package, import and distribution name alike; the requirement the `autoattack` extra pins)
_PACKAGES = {
    "official": ("pyautoattack", "pyautoattack>=0.2,<0.3"),
    "torchattacks": ("torchattacks", "torchattacks>=3.5.1,<3.6"),
}
_MIN_CLASSES = {"standard": 4, "apgd": 3}  # APGD-T's targeted DLR loss reads the 4th-largest logit, DLR the 3rd
_warned_targets: set[int] = set()


class AutoAttackWarning(UserWarning):
    """A check of AutoAttack's failed on a batch: the message names the implementation, the attack and the check."""


@dataclass(frozen=True)
class AutoAttackResult:
    """What one run of an :class:`AutoAttackSpec` found on a batch (:meth:`AutoAttackSpec.run`).

    Attributes:
        images: the adversarial images: for each example, the first verified adversarial example (projected onto
            the ε-ball and [0, 1], then classified again), or the clean image when none was found or the example is
            misclassified clean.
        robust: per example, whether it is classified correctly clean and on ``images``.
        stages: the number of examples left robust after each stage, in order: ``"clean"``, then each attack by
            title (``"APGD-CE"``, ``"APGD-T"``, ``"FAB-T"``, ``"Square"``; ``"APGD-DLR"``), each counted by the
            cascade itself (the official code's own log). A stage that the official code did not log is absent.
        flags: ``(attack, message)`` for each check that failed: the attack it concerns (``"checks"`` for those the
            official code runs before the first attack), the check's own words.
        code: the code that ran, e.g. ``"pyautoattack 0.2.0"``.
    """

    images: Tensor
    robust: Tensor
    stages: dict[str, int]
    flags: tuple[tuple[str, str], ...]
    code: str


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
        targets = _targets(num_classes)
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
        flags = _collapsed(result.flags)
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
        threat = self.threat
        epsilon = threat.radius(self.epsilon_for(epsilon), "epsilon")
        home = x.device
        device = next((p.device for p in model.parameters()), home)
        draw_on = generator.device if generator is not None else None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=draw_on))
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with (
            temporary_mode(model, training=False),
            _no_parameter_gradients(model),
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.random.fork_rng(devices=cuda),
        ):
            x, y = x.detach().to(device).clone(), y.detach().to(device).clone()
            with torch.no_grad():
                logits = model(x)
            clean = logits.argmax(dim=1) == y
            targets = self._targets_for(logits.shape[1])
            if self.implementation == "official":
                # torchattacks_norm: "Linf" or "L2", the official code's names too
                found, stages, flags = run_official(
                    model, x, y, clean=int(clean.sum()), norm=threat.torchattacks_norm, epsilon=epsilon, seed=seed,
                    version=self.version, steps=self.steps, queries=self.queries, restarts=self.restarts,
                    targets=targets, verbose=self.verbose,
                )  # fmt: skip
            else:
                found, stages, flags = run_torchattacks(
                    model, x, y, clean, threat=threat, epsilon=epsilon, seed=seed, version=self.version,
                    steps=self.steps, queries=self.queries, restarts=self.restarts, targets=targets,
                    verbose=self.verbose,
                )  # fmt: skip
            candidate = threat.project_images(found.to(device, x.dtype), x, epsilon)  # verified in the ball, [0, 1]
            with torch.no_grad():
                broken = clean & (model(candidate).argmax(dim=1) != y)
            images = torch.where(broken.view(-1, *[1] * (x.dim() - 1)), candidate, x).detach()
        return AutoAttackResult(images.to(home), (clean & ~broken).to(home), stages, tuple(flags), self.code)

    def _targets_for(self, num_classes: int) -> int:
        """APGD-T's and FAB-T's number of target classes, once the classes are checked (warned about below 10)."""
        needed = _MIN_CLASSES[self.version]
        if num_classes < needed:
            raise ValueError(
                f"{self.title} needs a model with at least {needed} classes (its DLR loss divides by a gap between "
                f"sorted logits), got {num_classes}: evaluate with PGD and CW instead, e.g. test_attacks='pgd20' or "
                "a list of AttackSpec(loss='cw')."
            )
        if self.version == "standard" and num_classes < 10 and num_classes not in _warned_targets:
            _warned_targets.add(num_classes)
            warnings.warn(
                f"AutoAttack: the model has {num_classes} classes, so APGD-T and FAB-T target the {num_classes - 1} "
                "other classes (the standard version's 9 need 10 classes).",
                stacklevel=4,
            )
        return _targets(num_classes)


def _targets(num_classes: int) -> int:
    """APGD-T's and FAB-T's number of target classes for a model with ``num_classes`` classes."""
    return min(num_classes, 10) - 1


def _collapsed(flags: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """One flag per attack and check: the first message of those that differ only in their numbers, with how many
    more there were."""
    alike: dict[tuple[str, str], list[str]] = {}
    for attack, message in flags:
        alike.setdefault((attack, re.sub(r"\d+(?:\.\d+)?", "#", message)), []).append(message)
    return [
        (attack, messages[0] + (f" ({len(messages) - 1} more like it)" if len(messages) > 1 else ""))
        for (attack, _), messages in alike.items()
    ]


@contextmanager
def _no_parameter_gradients(model: nn.Module) -> Iterator[None]:
    """The parameters of ``model`` need no gradient for a while (FAB's ``backward`` would accumulate one into them);
    each gets its own ``requires_grad`` back."""
    saved = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in saved:
            parameter.requires_grad_(requires_grad)


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
