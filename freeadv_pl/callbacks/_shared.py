"""What the attacking callbacks share: their threat model and ε, their attack, the first validation/test DataLoader,
when to run and counts summed over the processes."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from freeadv_pl._suite import checked_epsilon, missing_members, needs_epsilon
from freeadv_pl.evaluation import SuiteAttack
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model


def init_norm_and_epsilon(norm: str | None, epsilon: float | str | None) -> tuple[str | None, float | None]:
    """A callback's ``norm`` and ``epsilon`` arguments, checked: ε against the norm's threat model when one is given,
    otherwise as a radius of some threat model (checked against the module's norm at the first use)."""
    norm = None if norm is None else threat_model(norm).norm
    return norm, None if epsilon is None else check_radius(epsilon, "epsilon", norm)


def threat(callback: Callback, pl_module: LightningModule) -> ThreatModel:
    """The evaluation's threat model: the callback's ``norm``, else the module's, else L∞."""
    norm = callback.norm if callback.norm is not None else getattr(pl_module, "norm", None)
    return threat_model(norm or "linf")


def epsilon(
    callback: Callback, pl_module: LightningModule, attacks: Sequence[SuiteAttack], threat: ThreatModel
) -> float:
    """The ε of ``attacks`` in ``threat``: 0.0 when none needs one (natural accuracy, or each sets its own), else the
    callback's ``epsilon``, else the module's; a ``ValueError`` naming the fix when neither has one or it does not
    fit the threat model."""
    if not any(needs_epsilon(attack) for attack in attacks):
        return 0.0
    name = type(callback).__name__
    own = callback.epsilon is not None
    value = callback.epsilon if own else getattr(pl_module, "epsilon", None)
    if value is None:
        raise ValueError(
            f"{name} needs an ε: {type(pl_module).__name__} has no `epsilon`. Set {name}(epsilon=...) (e.g. 8/255; in "
            "YAML: epsilon: 8/255)."
        )
    try:
        return checked_epsilon(attacks, value, threat)
    except ValueError as error:
        source = f"{name}(epsilon={value!r})" if own else f"{type(pl_module).__name__}.epsilon"
        if callback.norm is not None:
            norm = f"{name}(norm={callback.norm!r})"
        else:
            has = getattr(pl_module, "norm", None) is not None
            norm = f"{type(pl_module).__name__}.norm" if has else f"the default: {type(pl_module).__name__} has no norm"
        raise ValueError(
            f"{source} does not fit the threat model: {error}. The evaluation's norm is {threat.symbol} ({norm}): "
            f"give {name} an ε of its range, or the norm the ε is meant for, e.g. {name}(norm='l2')."
        ) from None


def resolved_attack(attack: SuiteAttack, threat: ThreatModel, callback: Callback) -> SuiteAttack:
    """``attack`` in ``threat`` (unless it names its own norm), its ε and step size checked against it, the message
    naming the callback."""
    try:
        return attack.resolved(threat.norm)
    except ValueError as error:
        raise ValueError(f"{type(callback).__name__}'s attack in the {threat.symbol} threat model: {error}") from None


def perturbing(attack: Any, purpose: str, example: str) -> SuiteAttack:
    """``attack`` if it is an attack of the :class:`~freeadv_pl.EvaluationAttack` protocol (an ``AttackSpec``, an
    ``AutoAttackSpec`` or one of the user's) that perturbs the images; ``purpose`` says what natural accuracy
    (``perturbs`` False: ``AttackSpec(steps=0)``) would defeat."""
    if missing := missing_members(attack):
        raise TypeError(
            f"attack must be an attack such as {example}: a freeadv_pl.AttackSpec, AutoAttackSpec or an attack of "
            f"your own with the members of freeadv_pl.EvaluationAttack; got {type(attack).__name__}, which lacks "
            f"{', '.join(missing)}"
        )
    if not getattr(attack, "perturbs", True):
        raise ValueError(
            f"attack must perturb the images (an AttackSpec with steps ≥ 1): with natural accuracy there is {purpose}. "
            f"Use e.g. {example}."
        )
    return attack


def takes_model_mode(attack: Any) -> bool:
    """Whether calling ``attack`` accepts ``model_mode="eval" | "train"`` (``AttackSpec`` does; the optional member of
    :class:`~freeadv_pl.EvaluationAttack` that runs the attack with the model in training mode)."""
    try:
        parameters = inspect.signature(attack).parameters
    except (TypeError, ValueError):
        return False
    return "model_mode" in parameters


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
