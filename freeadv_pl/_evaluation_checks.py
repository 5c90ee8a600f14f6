"""The checks of an evaluation that say a figure may overstate robustness, shared by ``RobustEvaluation`` and
``freeadv_pl evaluate`` (docs/evaluation.md, "Honest evaluation"): on the first batch, outputs that look like
probabilities and inputs with zero gradient; after the suite, AutoAttack far below PGD-20 of the same radius."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.autoattack import AutoAttackSpec

MASKING_GAP = 0.05
"""AutoAttack this far below PGD-20 (same norm, same ε, same examples): PGD's gradients mislead it."""


def first_batch_warnings(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """What the first batch ``x`` (labels ``y``) shows about ``model``: outputs that sum to one like probabilities
    (attacks need logits), and a loss with zero gradient for every input (masked gradients)."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = x.detach().clone().requires_grad_(True)
        outputs = model(inputs)
        (gradient,) = torch.autograd.grad(F.cross_entropy(outputs, y.detach().clone()), inputs)
    outputs = outputs.detach()
    found = []
    if bool((outputs >= 0).all()) and torch.allclose(outputs.sum(dim=1), torch.ones_like(outputs[:, 0]), atol=1e-4):
        found.append(
            "the model's outputs sum to one like probabilities: attacks need logits. Remove the final softmax."
        )
    if not bool(gradient.abs().gt(0).any()):
        found.append(
            "the loss has zero gradient with respect to every input of the first batch: the model masks its "
            "gradients (e.g. a non-differentiable step), so gradient attacks overestimate its robustness."
        )
    return found


def masking_warnings(suite: Sequence[Any], results: dict[str, float], epsilon: float = 0.0) -> list[str]:
    """One message per standard AutoAttack column of ``suite`` whose accuracy in ``results`` (by key) is more than
    :data:`MASKING_GAP` below the PGD-20 column of the same norm and radius: the sign of masked gradients."""
    found = []
    for attack in suite:
        if not (isinstance(attack, AutoAttackSpec) and attack.version == "standard"):
            continue
        radius = (attack.threat.norm, attack.epsilon_for(epsilon))
        pgd20 = next(
            (
                a
                for a in suite
                if isinstance(a, AttackSpec)
                and (a.steps, a.loss, a.restarts) == (20, "ce", 1)
                and (a.threat.norm, a.epsilon_for(epsilon)) == radius
            ),
            None,
        )
        gap = 0.0 if pgd20 is None else results[pgd20.key] - results[attack.key]
        if gap > MASKING_GAP:
            found.append(
                f"{attack.title}'s accuracy ({100 * results[attack.key]:.1f} %) is {100 * gap:.1f} points below "
                f"{pgd20.title}'s ({100 * results[pgd20.key]:.1f} %) on the same examples: the model likely masks "
                f"its gradients, so PGD numbers overstate its robustness. Report {attack.title}'s."
            )
    return found
