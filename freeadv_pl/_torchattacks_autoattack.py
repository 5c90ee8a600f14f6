"""torchattacks' port of AutoAttack on one batch, run as the official code runs it (pure PyTorch, no Lightning): the
cascade of the official attacks with the official parameters, each on the examples that the earlier ones left
robust, and the official check of Square."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from freeadv_pl._official_autoattack import STAGES
from freeadv_pl.threat_models import ThreatModel

SQUARE_GAP = 0.002
"""Square this far below the gradient attacks (a fraction of the batch) raises the official check's flag."""


def run_torchattacks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean: Tensor,
    *,
    threat: ThreatModel,
    epsilon: float,
    seed: int,
    version: str,
    steps: int,
    queries: int,
    restarts: int,
    targets: int,
    verbose: bool,
) -> tuple[Tensor, dict[str, int], list[tuple[str, str]]]:
    """The adversarial images (``x`` where none was found), the robust count after each stage and the flags of
    torchattacks' cascade on ``x`` (labels ``y``; ``clean`` marks the examples classified right). Attack ``n`` is
    seeded with ``seed + n``; a candidate counts once projected into the ε-ball and [0, 1] and classified again."""
    builders = attack_factories(threat.torchattacks_norm, version, steps, queries, restarts, targets + 1, verbose)
    robust, x_adv = clean.clone(), x.clone()
    stages = {"clean": int(robust.sum())}
    for number, (title, build) in enumerate(zip(STAGES[version], builders, strict=True)):
        index = robust.nonzero().squeeze(1)
        if index.numel() > 0:
            found = build(model, epsilon, seed + number)(x[index], y[index]).to(x.device, x.dtype)
            candidate = threat.project_images(found, x[index], epsilon)
            with torch.no_grad():
                broken = model(candidate).argmax(dim=1) != y[index]
            x_adv[index[broken]] = candidate[broken]
            robust[index[broken]] = False
        stages[title] = int(robust.sum())
    return x_adv, stages, _square_flag(stages, len(y))


def attack_factories(
    norm: str, version: str, steps: int, queries: int, restarts: int, num_classes: int, verbose: bool
) -> list[Any]:
    """Factories ``(model, ε, seed) -> torchattacks attack``, in the order they run, for ``num_classes`` classes
    (10 or more: the standard version's 9 targets)."""
    import torchattacks

    common = {"norm": norm, "steps": steps, "n_restarts": restarts}
    apgd = {**common, "eot_iter": 1, "rho": 0.75, "verbose": verbose}

    def apgd_ce(model: nn.Module, epsilon: float, seed: int) -> Any:
        return torchattacks.APGD(model, eps=epsilon, seed=seed, loss="ce", **apgd)

    if version == "apgd":

        def apgd_dlr(model: nn.Module, epsilon: float, seed: int) -> Any:
            return torchattacks.APGD(model, eps=epsilon, seed=seed, loss="dlr", **apgd)

        return [apgd_ce, apgd_dlr]
    classes = min(num_classes, 10)  # torchattacks targets n_classes − 1 classes; the official code 9

    def apgd_t(model: nn.Module, epsilon: float, seed: int) -> Any:
        return torchattacks.APGDT(model, eps=epsilon, seed=seed, n_classes=classes, **apgd)

    def fab_t(model: nn.Module, epsilon: float, seed: int) -> Any:
        fab = {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9, "multi_targeted": True, "verbose": verbose}
        return torchattacks.FAB(model, eps=epsilon, seed=seed, n_classes=classes, **common, **fab)

    def square(model: nn.Module, epsilon: float, seed: int) -> Any:
        return torchattacks.Square(
            model,
            norm=norm,
            eps=epsilon,
            n_queries=queries,
            n_restarts=restarts,
            p_init=0.8,
            loss="margin",
            resc_schedule=False,  # the official standard version's: p's schedule is that of 10,000 queries
            seed=seed,
            verbose=verbose,
        )

    return [apgd_ce, apgd_t, fab_t, square]


def _square_flag(stages: dict[str, int], examples: int) -> list[tuple[str, str]]:
    """The official code's check of Square, on torchattacks' cascade: a flag when Square breaks more than 0.2 % of
    the batch that the gradient attacks left robust (a sign that their gradients mislead them)."""
    if "Square" not in stages:
        return []
    gap = (stages["FAB-T"] - stages["Square"]) / examples
    if gap <= SQUARE_GAP:
        return []
    message = (
        f"Square Attack has decreased the robust accuracy of {gap:.2%} after the gradient-based attacks: their "
        "gradients may be masked, so the evaluation may be unreliable. Run Square with more queries and restarts, "
        "or an adaptive attack."
    )
    return [("Square", message)]
