"""One batch of an :class:`~freeadv_pl.autoattack.AutoAttackSpec`: the run of either implementation in eval mode,
seeded and without parameter gradients, the verification of what it found, and its flags, one per attack and check.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from freeadv_pl._modes import no_parameter_gradients, temporary_mode
from freeadv_pl._official_autoattack import run_official
from freeadv_pl._torchattacks_autoattack import run_torchattacks

if TYPE_CHECKING:
    from freeadv_pl.autoattack import AutoAttackSpec

_MIN_CLASSES = {"standard": 4, "apgd": 3}  # APGD-T's targeted DLR loss reads the 4th-largest logit, DLR the 3rd
_warned_targets: set[int] = set()


@dataclass(frozen=True)
class AutoAttackResult:
    """What one run of an :class:`~freeadv_pl.autoattack.AutoAttackSpec` found on a batch (its ``run``).

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


def attack_batch(
    spec: AutoAttackSpec, model: nn.Module, x: Tensor, y: Tensor, epsilon: float, generator: torch.Generator | None
) -> AutoAttackResult:
    """Run ``spec``'s attacks on ``x`` (labels ``y``) on ``model``'s device at the checked radius ``epsilon``, every
    attack seeded with one number drawn from ``generator``, inside ``torch.random.fork_rng``."""
    threat = spec.threat
    home = x.device
    device = next((p.device for p in model.parameters()), home)
    draw_on = generator.device if generator is not None else None
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=draw_on))
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with (
        temporary_mode(model, training=False),
        no_parameter_gradients(model),  # FAB's backward passes would leave a gradient in them
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.random.fork_rng(devices=cuda),
    ):
        x, y = x.detach().to(device).clone(), y.detach().to(device).clone()
        with torch.no_grad():
            logits = model(x)
        clean = logits.argmax(dim=1) == y
        targets = _checked_targets(spec, logits.shape[1])
        common = {
            "epsilon": epsilon, "seed": seed, "version": spec.version, "steps": spec.steps, "queries": spec.queries,
            "restarts": spec.restarts, "targets": targets, "verbose": spec.verbose,
        }  # fmt: skip
        if spec.implementation == "official":  # torchattacks_norm: "Linf" or "L2", the official code's names too
            found, stages, flags = run_official(
                model, x, y, clean=int(clean.sum()), norm=threat.torchattacks_norm, **common
            )
        else:
            found, stages, flags = run_torchattacks(model, x, y, clean, threat=threat, **common)
        candidate = threat.project_images(found.to(device, x.dtype), x, epsilon)  # verified in the ball, [0, 1]
        with torch.no_grad():
            broken = clean & (model(candidate).argmax(dim=1) != y)
        images = torch.where(broken.view(-1, *[1] * (x.dim() - 1)), candidate, x).detach()
    return AutoAttackResult(images.to(home), (clean & ~broken).to(home), stages, tuple(flags), spec.code)


def target_classes(num_classes: int) -> int:
    """APGD-T's and FAB-T's number of target classes for a model with ``num_classes`` classes."""
    return min(num_classes, 10) - 1


def collapsed_flags(flags: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """One flag per attack and check: the first message of those that differ only in their numbers, with how many
    more there were (the official code repeats some for each target class)."""
    alike: dict[tuple[str, str], list[str]] = {}
    for attack, message in flags:
        alike.setdefault((attack, re.sub(r"\d+(?:\.\d+)?", "#", message)), []).append(message)
    return [
        (attack, messages[0] + (f" ({len(messages) - 1} more like it)" if len(messages) > 1 else ""))
        for (attack, _), messages in alike.items()
    ]


def _checked_targets(spec: AutoAttackSpec, num_classes: int) -> int:
    """APGD-T's and FAB-T's number of target classes, once the classes are checked (warned about below 10)."""
    needed = _MIN_CLASSES[spec.version]
    if num_classes < needed:
        raise ValueError(
            f"{spec.title} needs a model with at least {needed} classes (its DLR loss divides by a gap between "
            f"sorted logits), got {num_classes}: evaluate with PGD and CW instead, e.g. test_attacks='pgd20' or "
            "a list of AttackSpec(loss='cw')."
        )
    if spec.version == "standard" and num_classes < 10 and num_classes not in _warned_targets:
        _warned_targets.add(num_classes)
        warnings.warn(
            f"AutoAttack: the model has {num_classes} classes, so APGD-T and FAB-T target the {num_classes - 1} "
            "other classes (the standard version's 9 need 10 classes).",
            stacklevel=5,
        )
    return target_classes(num_classes)
