"""What the attacking callbacks share: their ε, their attack, the first validation/test DataLoader, when to run and
counts summed over the processes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from freeadv_pl.evaluation import AttackSpec, SuiteAttack


def epsilon(callback: Callback, pl_module: LightningModule, attacks: Sequence[SuiteAttack]) -> float:
    """The ε of ``attacks``: 0.0 when none needs one (natural accuracy, or each sets its own), else the callback's
    ``epsilon``, else the module's; a ``ValueError`` naming the fix when neither has one."""
    if all(attack.steps == 0 or attack.epsilon is not None for attack in attacks):
        return 0.0
    epsilon = callback.epsilon if callback.epsilon is not None else getattr(pl_module, "epsilon", None)
    if epsilon is None:
        name = type(callback).__name__
        raise ValueError(
            f"{name} needs an ε: {type(pl_module).__name__} has no `epsilon`. Set {name}(epsilon=...) (e.g. 8/255; in "
            "YAML: epsilon: 8/255)."
        )
    return float(epsilon)


def perturbing(attack: Any, purpose: str, example: str) -> AttackSpec:
    """``attack`` if it is an :class:`AttackSpec` with steps ≥ 1; ``purpose`` says what steps=0 would defeat."""
    if not isinstance(attack, AttackSpec):
        raise TypeError(f"attack must be a freeadv_pl.AttackSpec such as {example}, got {type(attack).__name__}")
    if attack.steps < 1:
        raise ValueError(f"attack must have steps ≥ 1: with steps=0 there is {purpose}. Use e.g. {example}.")
    return attack


def first_loader(trainer: Trainer, stage: str) -> Any:
    """The first validation (``stage="validate"``) or test DataLoader, however Lightning holds them."""
    loaders = trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()))
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


def validation_due(trainer: Trainer, every_n_epochs: int) -> bool:
    """At a validation epoch's end: not in the sanity check, and in ``fit`` only every ``every_n_epochs``-th."""
    if trainer.sanity_checking:
        return False
    return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % every_n_epochs == 0


def summed(trainer: Trainer, device: torch.device, counts: Sequence[int]) -> torch.Tensor:
    """``counts`` summed over the processes (a float tensor): every process gets the figure one process would."""
    return trainer.strategy.reduce(torch.tensor(counts, dtype=torch.float, device=device), reduce_op="sum")
