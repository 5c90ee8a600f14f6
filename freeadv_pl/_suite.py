"""The one counting loop behind every robust-accuracy figure (:func:`~freeadv_pl.robust_accuracy` and the callbacks),
and what it needs to know of a suite's attacks (pure PyTorch, no Lightning).

The attacks are any objects of the :class:`~freeadv_pl.evaluation.EvaluationAttack` protocol; this module reads only
their ``key``, ``title``, ``epsilon``, optional ``perturbs`` and ``norm``, and calls them, so it imports neither the
specs nor the protocol.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from freeadv_pl._modes import temporary_mode
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model

WORST, EXAMPLES = "worst", "examples"  # the worst case's and the example count's keys, beside the attacks'
MEMBERS = ("key", "title", "epsilon", "describe", "resolved")  # besides __call__: see EvaluationAttack


def missing_members(attack: Any) -> list[str]:
    """The members of the ``EvaluationAttack`` protocol that ``attack`` lacks (``__call__`` included)."""
    missing = [name for name in MEMBERS if not hasattr(attack, name)]
    return missing + ([] if callable(attack) else ["__call__"])


def needs_epsilon(attack: Any) -> bool:
    """Whether ``attack`` takes the evaluation's ε: it sets none of its own and perturbs the images at all (natural
    accuracy, ``perturbs = False``, needs no ε)."""
    return attack.epsilon is None and getattr(attack, "perturbs", True)


def own_epsilon(attack: Any, default: float) -> float:
    """The radius ``attack`` runs at: its own ``epsilon`` (a number or a string like ``"8/255"``, checked against its
    ``norm`` if it has one), else ``default``, the evaluation's."""
    return default if attack.epsilon is None else check_radius(attack.epsilon, "epsilon", getattr(attack, "norm", None))


def checked_epsilon(suite: Sequence[Any], epsilon: float | str, threat: ThreatModel) -> float:
    """The evaluation's ε as a number, checked against the threat model of every attack that takes it: the attack's
    own ``norm`` (set once resolved; optional for a user's attack), else ``threat``, the evaluation's."""
    value = check_radius(epsilon, "epsilon")
    for attack in suite:
        if needs_epsilon(attack):
            norm = getattr(attack, "norm", None)
            own = threat if norm is None else threat_model(norm)
            try:
                own.radius(value, "epsilon")
            except ValueError as error:
                raise ValueError(f"{error} ({attack.title} runs in {own.symbol})") from None
    return value


def bind(suite: Sequence[Any], model: nn.Module, epsilon: float, **options: Any) -> dict[str, Callable[..., Tensor]]:
    """The suite as :func:`count` takes it: by key, ``(x, y, generator=...) -> adversarial x`` on ``model`` at ε;
    ``options`` go to every attack (e.g. ``model_mode`` to an ``AttackSpec``)."""
    return {attack.key: functools.partial(attack, model, epsilon=epsilon, **options) for attack in suite}


def count(
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
    """Correct examples per key of ``attacks`` (``(x, y, generator=...) -> x_adv``), under every one (``WORST``) and
    in all (``EXAMPLES``). Batch ``b`` (``numbers[i]`` for the i-th; default ``i``) seeds the generator with
    ``seed + b``; ``inspect`` sees the first batch; ``training`` is the model's mode."""
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
