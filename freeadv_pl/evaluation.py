"""Accuracy of a model on a dataset, clean or under an attack, and the paper's attack suites (pure PyTorch, no
Lightning)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import ModelMode, pgd
from freeadv_pl.autoattack import AutoAttackSpec

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""Maps (model, images, labels) to adversarial images, e.g. ``functools.partial(pgd, epsilon=0.1, ...)``."""
WORST, EXAMPLES = "worst", "examples"  # robust_accuracy's keys beside the attacks'


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
    counts = _count(model, batches, {"attack": lambda x, y, generator: x if attack is None else attack(model, x, y)})
    return counts["attack"], counts[EXAMPLES]


def _count(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: dict[str, Callable[..., Tensor]],
    *,
    seed: int = 0,
    numbers: Iterable[int] | None = None,
    bf16: bool = False,
    training: bool = False,
    inspect: Callable[[nn.Module, Tensor, Tensor], None] | None = None,
) -> dict[str, int]:
    """The one counting loop: correct examples per key of ``attacks`` (``(x, y, generator=...) -> x_adv``), under
    every one (``WORST``) and in all (``EXAMPLES``). Batch ``b`` (``numbers[i]`` for the i-th; default ``i``) seeds
    the generator with ``seed + b``; ``inspect`` sees the first batch; ``training`` is the model's mode."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    counts = dict.fromkeys([*attacks, WORST, EXAMPLES], torch.zeros((), dtype=torch.long, device=device))
    with temporary_mode(model, training):
        for number, (x, y) in zip(itertools.count() if numbers is None else numbers, batches):
            x, y = x.to(device), y.to(device)
            if inspect is not None:
                inspect(model, x, y)
                inspect = None
            unbroken = torch.ones_like(y, dtype=torch.bool)
            for key, attack in attacks.items():
                generator.manual_seed(seed + number)  # the same starts for every attack: restarts never help
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    x_adv = attack(x, y, generator=generator)
                    with torch.no_grad():
                        correct = model(x_adv).argmax(dim=1) == y
                unbroken &= correct
                counts[key] = counts[key] + correct.sum()
            counts[WORST] = counts[WORST] + unbroken.sum()
            counts[EXAMPLES] = counts[EXAMPLES] + len(y)
    return {key: int(count) for key, count in counts.items()}


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

    def describe(self, epsilon: float, num_classes: int = 10) -> str:
        """Everything that defines the number: attack, loss, ε, step, restarts and start (for any ``num_classes``)."""
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


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: str | Sequence[SuiteAttack],
    epsilon: float | str,
    *,
    seed: int = 0,
    bf16: bool = False,
) -> dict[str, float]:
    """Accuracy of ``model`` under each attack of a suite, and per example under the worst of them: the numbers
    :class:`~freeadv_pl.RobustEvaluation` logs on the same batches. Batch ``b``'s random starts are seeded with
    ``seed + b`` for every attack, so a multi-restart attack never does better than its single-restart version.

    Args:
        model: maps images in [0, 1] to logits; it runs in eval mode (modes restored), on its parameters' device.
        batches: ``(images, labels)`` pairs, e.g. a DataLoader.
        attacks: a preset name of :data:`ATTACK_PRESETS` or a list of :class:`AttackSpec`/:class:`AutoAttackSpec`.
        epsilon: the L∞ radius (a float or ``"8/255"``) of the attacks that set none of their own.
        seed: seed of the random starts.
        bf16: run the attacks' forward passes under bf16 autocast (weaker attacks: not for reported numbers).

    Returns:
        The accuracy by attack ``key``; under ``"worst"``, of the examples every attack leaves correct; under
        ``"examples"``, their number.

    Raises:
        ValueError: on an unknown preset, an empty or duplicated suite, or no examples.
        ModuleNotFoundError: on an AutoAttack suite without torchattacks.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))]
        >>> sorted(robust_accuracy(model, batches, "pgd20", "8/255"))
        ['examples', 'natural', 'pgd20', 'worst']
    """
    suite, epsilon = _suite(attacks, "attacks"), as_pixel_fraction(epsilon, "epsilon")
    counts = _count(model, batches, _bind(suite, model, epsilon), seed=seed, bf16=bf16)
    examples = counts.pop(EXAMPLES)
    if not examples:
        raise ValueError("robust_accuracy got no examples: pass batches of (images, labels), e.g. a DataLoader")
    return {key: count / examples for key, count in counts.items()} | {EXAMPLES: examples}


def _bind(suite: Sequence[SuiteAttack], model: nn.Module, epsilon: float, **options: str) -> dict[str, Callable]:
    """The suite as ``_count`` takes it: by key, ``(x, y, generator=...) -> adversarial x`` on ``model`` at ε."""
    return {attack.key: functools.partial(attack, model, epsilon=epsilon, **options) for attack in suite}


def _suite(attacks: str | Sequence[SuiteAttack], name: str) -> tuple[SuiteAttack, ...]:
    """A preset or a list of attacks, checked; ``name`` is the argument's name for the messages."""
    if isinstance(attacks, str):
        if attacks not in ATTACK_PRESETS:
            raise ValueError(f"{name}={attacks!r} is not a preset: use one of {', '.join(ATTACK_PRESETS)} or a list")
        suite = ATTACK_PRESETS[attacks]
    else:
        suite = tuple(attacks)
        if not suite or not all(isinstance(attack, (AttackSpec, AutoAttackSpec)) for attack in suite):
            raise ValueError(
                f"{name} must be a preset name or a non-empty list of AttackSpec/AutoAttackSpec, got {attacks!r}"
            )
        keys = [attack.key for attack in suite]
        if len(set(keys)) != len(keys) or {WORST, EXAMPLES} & set(keys):
            raise ValueError(
                f"{name} has attacks with the same name, or one named {WORST!r} or {EXAMPLES!r} (the worst case's and "
                f"the example count's keys): {keys}. Give them distinct `name`s."
            )
    if any(isinstance(attack, AutoAttackSpec) for attack in suite):
        AutoAttackSpec.ensure_available()  # before training, not at its end
    return suite
