"""Accuracy of a model on a dataset, clean or under an attack, and the paper's attack suites, in the L∞ or the L2
threat model (pure PyTorch, no Lightning).

A suite's columns are any objects of the :class:`EvaluationAttack` protocol: :class:`AttackSpec` (natural, PGD-k,
CW-k), :class:`~freeadv_pl.AutoAttackSpec`, or a user's own attack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from freeadv_pl._suite import EXAMPLES, WORST, bind, checked_epsilon, count, missing_members
from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.autoattack import AutoAttackSpec
from freeadv_pl.threat_models import ThreatModel, threat_model

__all__ = [
    "ATTACK_PRESETS",
    "Attack",
    "AttackSpec",
    "EvaluationAttack",
    "SuiteAttack",
    "attack_suite",
    "count_correct",
    "robust_accuracy",
]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""Maps (model, images, labels) to adversarial images, e.g. ``functools.partial(pgd, epsilon=0.1, ...)``."""


def count_correct(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], attack: Attack | None = None
) -> tuple[int, int]:
    """``(correct, total)``: how many examples ``model`` classifies correctly, clean or on ``attack``'s images.

    Args:
        model: maps images in [0, 1] to logits; it runs in eval mode (modes restored), on its parameters' device.
        batches: ``(images, labels)`` pairs, e.g. a DataLoader.
        attack: None for clean accuracy, otherwise a function returning adversarial images.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> count_correct(model, [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))])[1]
        3
    """
    counts = count(model, batches, {"attack": lambda x, y, generator: x if attack is None else attack(model, x, y)})
    return counts["attack"], counts[EXAMPLES]


@runtime_checkable
class EvaluationAttack(Protocol):
    """What an evaluation suite needs of an attack: one column of :func:`robust_accuracy` and
    :class:`~freeadv_pl.RobustEvaluation`. :class:`AttackSpec` and :class:`~freeadv_pl.AutoAttackSpec` are two.

    To plug in an attack of your own, give it these members and put it in the suite's list:

    - ``key``: the metric's name (``val/robust/<key>``), distinct within the suite; by convention it names the norm
      outside L∞ (:meth:`~freeadv_pl.threat_models.ThreatModel.key`: ``pgd20_l2``).
    - ``title``: the column's title in the printed report (:meth:`~freeadv_pl.threat_models.ThreatModel.title`).
    - ``epsilon``: None to take the evaluation's ε, or a radius of its own.
    - ``describe(epsilon, num_classes)``: everything that defines the number, for the report.
    - ``resolved(norm)``: the attack in the evaluation's threat model (``"linf"`` or ``"l2"``) if it leaves the norm
      to the evaluation, itself otherwise; the suite resolves every column before reading its ``key``.
    - ``__call__(model, x, y, epsilon, generator=None)``: the adversarial images, in [0, 1] and in the ε-ball.
      ``epsilon`` is the evaluation's ε (the attack's own ``epsilon`` wins over it); ``generator`` is seeded with
      ``seed + b`` for batch ``b``, the same for every column; gradients are the attack's to switch on (it may be
      called under ``no_grad`` or ``inference_mode``) and the model's mode is eval.

    Optional: ``perturbs = False`` for a column that returns the images unchanged (it then needs no ε); ``norm``
    (``"linf"`` or ``"l2"`` once resolved) to have the evaluation's ε checked against your attack's norm before it
    runs (otherwise against the evaluation's); a ``model_mode="eval" | "train"`` keyword of ``__call__``, which
    :class:`~freeadv_pl.CatastrophicOverfittingGuard`'s ``model_mode="train"`` needs. An example counts under
    ``worst`` only if every column leaves it correct. The guard and :class:`~freeadv_pl.AdversarialExamplesLogger`
    take such an attack as their ``attack``.

    Example:
        The best of a few random points of the ball, a weak baseline, as a column:

        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class RandomNoise:
        ...     tries: int = 10
        ...     norm: str | None = None
        ...     epsilon: float | None = None
        ...
        ...     @property
        ...     def key(self):
        ...         return threat_model(self.norm or "linf").key(f"noise{self.tries}")
        ...
        ...     @property
        ...     def title(self):
        ...         return threat_model(self.norm or "linf").title(f"Noise-{self.tries}")
        ...
        ...     def describe(self, epsilon, num_classes=10):
        ...         return f"{self.tries} random points ({threat_model(self.norm or 'linf').describe(epsilon)})"
        ...
        ...     def resolved(self, norm):
        ...         return self if self.norm else dataclasses.replace(self, norm=norm)
        ...
        ...     def __call__(self, model, x, y, epsilon, generator=None):
        ...         threat, best = threat_model(self.norm or "linf"), x
        ...         with torch.no_grad():
        ...             for _ in range(self.tries):
        ...                 point = threat.project_images(x + threat.random_start(x, epsilon, generator), x, epsilon)
        ...                 wrong = model(point).argmax(dim=1) != y
        ...                 best = torch.where(wrong.view(-1, 1, 1, 1), point, best)
        ...         return best
        >>> isinstance(RandomNoise(), EvaluationAttack)
        True
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))]
        >>> sorted(robust_accuracy(model, batches, [AttackSpec(steps=0), RandomNoise()], 0.5, norm="l2"))
        ['examples', 'natural', 'noise10_l2', 'worst']
    """

    @property
    def key(self) -> str: ...

    @property
    def title(self) -> str: ...

    @property
    def epsilon(self) -> float | str | None: ...

    def describe(self, epsilon: float, num_classes: int = 10) -> str: ...

    def resolved(self, norm: str) -> EvaluationAttack: ...

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None = None
    ) -> Tensor: ...


SuiteAttack = AttackSpec | AutoAttackSpec | EvaluationAttack
"""One column of an evaluation suite: any :class:`EvaluationAttack`. The two specs are named so that a config file can
give them as mappings (``- steps: 20``, ``- version: apgd``)."""

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
    # The same in L2, whatever the training's norm.
    "pgd20_l2": (AttackSpec(steps=0), AttackSpec(steps=20, norm="l2")),
    # RobustBench's number: AutoAttack's standard version, beside PGD-20 (step ε/4) for the gradient-masking check.
    "autoattack": (AttackSpec(steps=0), AttackSpec(steps=20), AutoAttackSpec()),
    # The same in L2 (RobustBench's L2 leaderboard), whatever the training's norm.
    "autoattack_l2": (AttackSpec(steps=0), AttackSpec(steps=20, norm="l2"), AutoAttackSpec(norm="l2")),
    # A cheaper AutoAttack-style check for the end of each epoch: APGD-CE, then APGD-DLR.
    "apgd": (AttackSpec(steps=0), AutoAttackSpec(version="apgd")),
}
"""Attack suites by name, for ``RobustEvaluation(attacks="cifar")``. Attacks that name no norm take the
evaluation's; ``pgd20_l2`` and ``autoattack_l2`` are L2 whatever it is."""


def attack_suite(
    attacks: str | Sequence[SuiteAttack], norm: str | ThreatModel | None = None, *, name: str = "attacks"
) -> tuple[SuiteAttack, ...]:
    """The columns of a suite, checked: a preset's (:data:`ATTACK_PRESETS`) or a list of :class:`EvaluationAttack`;
    with ``norm``, each resolved in that threat model (:meth:`EvaluationAttack.resolved`) and their keys checked
    for duplicates. ``name`` is the argument's name in the messages.

    Raises:
        ValueError: on an unknown preset or norm, an empty list, or two columns with the same key (or one named
            ``worst`` or ``examples``).
        TypeError: on a column that lacks a member of the protocol (a preset's name inside a list, say).
        ModuleNotFoundError: on an AutoAttack column without its implementation's package.

    Example:
        >>> [attack.key for attack in attack_suite("autoattack", "l2")]
        ['natural', 'pgd20_l2', 'autoattack_l2']
    """
    if isinstance(attacks, str):
        if attacks not in ATTACK_PRESETS:
            raise ValueError(f"{name}={attacks!r} is not a preset: use one of {', '.join(ATTACK_PRESETS)} or a list")
        suite = ATTACK_PRESETS[attacks]
    else:
        suite = tuple(attacks) if isinstance(attacks, Iterable) else ()
        if not suite:
            raise ValueError(
                f"{name} must be a preset name or a non-empty list of AttackSpec/AutoAttackSpec (or attacks of your "
                f"own: freeadv_pl.EvaluationAttack), got {attacks!r}"
            )
        for index, attack in enumerate(suite):
            if isinstance(attack, str):
                raise TypeError(
                    f"{name}[{index}] is the string {attack!r}: a preset's name is given alone ({name}={attack!r}); "
                    "a list holds attacks, e.g. AttackSpec(steps=20)"
                )
            if missing := missing_members(attack):
                raise TypeError(
                    f"{name}[{index}] ({type(attack).__name__}) is no attack of a suite: it lacks "
                    f"{', '.join(missing)}. Use an AttackSpec or AutoAttackSpec, or give your attack the members of "
                    "freeadv_pl.EvaluationAttack."
                )
    if norm is not None:
        threat = threat_model(norm)
        suite = tuple(attack.resolved(threat.norm) for attack in suite)
    keys = [attack.key for attack in suite]
    if len(set(keys)) != len(keys) or {WORST, EXAMPLES} & set(keys):
        raise ValueError(
            f"{name} has attacks with the same name, or one named {WORST!r} or {EXAMPLES!r} (the worst case's and "
            f"the example count's keys): {keys}. Give them distinct `name`s."
        )
    for attack in suite:
        if isinstance(attack, AutoAttackSpec):
            attack.ensure_available()  # before training, not at its end
    return suite


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: str | Sequence[SuiteAttack],
    epsilon: float | str,
    *,
    norm: str | ThreatModel = "linf",
    seed: int = 0,
    bf16: bool = False,
) -> dict[str, float]:
    """Accuracy of ``model`` under each attack of a suite, and per example under the worst of them: the numbers
    :class:`~freeadv_pl.RobustEvaluation` logs on the same batches. Batch ``b``'s random starts are seeded with
    ``seed + b`` for every attack, so a multi-restart attack never does better than its single-restart version.

    Args:
        model: maps images in [0, 1] to logits; it runs in eval mode (modes restored), on its parameters' device.
        batches: ``(images, labels)`` pairs, e.g. a DataLoader.
        attacks: a preset name of :data:`ATTACK_PRESETS` or a list of :class:`EvaluationAttack`
            (:class:`AttackSpec`, :class:`~freeadv_pl.AutoAttackSpec`, your own).
        epsilon: the radius (a float or ``"8/255"``) of the attacks that set none of their own, checked against the
            norm of each (``robust_accuracy(model, batches, "autoattack_l2", 1.5)`` is an L2 evaluation).
        norm: the evaluation's threat model, ``"linf"`` or ``"l2"``: that of the attacks that name none (keys then
            name it outside L∞, e.g. ``pgd20_l2``).
        seed: seed of the random starts.
        bf16: run the attacks' forward passes under bf16 autocast (weaker attacks: not for reported numbers).

    Returns:
        The accuracy by attack ``key``; under ``"worst"``, of the examples every attack leaves correct; under
        ``"examples"``, their number.

    Raises:
        ValueError: on an unknown preset or norm, an ε outside the norm's range, an empty or duplicated suite, or no
            examples.
        TypeError: on a column that is no :class:`EvaluationAttack`.
        ModuleNotFoundError: on an AutoAttack suite without torchattacks.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))]
        >>> sorted(robust_accuracy(model, batches, "pgd20", "8/255"))
        ['examples', 'natural', 'pgd20', 'worst']
        >>> sorted(robust_accuracy(model, batches, "pgd20", 0.5, norm="l2"))
        ['examples', 'natural', 'pgd20_l2', 'worst']
    """
    threat = threat_model(norm)
    suite = attack_suite(attacks, threat)
    epsilon = checked_epsilon(suite, epsilon, threat)
    counts = count(model, batches, bind(suite, model, epsilon), seed=seed, bf16=bf16)
    examples = counts.pop(EXAMPLES)
    if not examples:
        raise ValueError("robust_accuracy got no examples: pass batches of (images, labels), e.g. a DataLoader")
    return {key: correct / examples for key, correct in counts.items()} | {EXAMPLES: examples}
