"""What a training module checks: the options it does not take, the DataModule it is given, its first batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from freeadv_pl._checks import check_int
from freeadv_pl.models.normalization import InputNormalization

TRADES_ELSEWHERE = (
    "TRADES and the other training losses are options of FreeAdversarialModule, PGDAdversarialModule and "
    "FastAdversarialModule (loss='trades', trades_beta=6.0)."
)
"""The advice of a module without a ``loss`` option."""


def refuse_options(module: str, given: dict[str, Any], options: dict[str, str]) -> None:
    """Raise a ``ValueError`` when ``given`` (a module's keyword arguments) holds one of ``options``, an option the
    module ``module`` does not have, with the option's advice (``options[name]``) as the fix."""
    for name, advice in options.items():
        if name in given:
            raise ValueError(f"{module} does not take {name}={given[name]!r}: {advice}")


def take_from_data(module: LightningModule, data: Any) -> None:
    """Give ``module`` the ``num_classes``, ``mean`` and ``std`` it was not given from the DataModule ``data`` (and
    record them in its hyperparameters, so that checkpoints rebuild the same model); check ``num_classes``."""
    declared = getattr(data, "num_classes", None)
    declared = declared if isinstance(declared, int) else None
    taken: dict[str, Any] = {}
    if module.num_classes is None:
        if declared is None:
            raise ValueError(
                f"num_classes is not given and the {'DataModule' if data is None else type(data).__name__} "
                "declares none: pass num_classes=... to the module (e.g. num_classes=10), or fit with a "
                "DataModule that has a num_classes attribute (every freeadv_pl DataModule has)."
            )
        module.num_classes = check_int(declared, "num_classes", minimum=2)
        taken["num_classes"] = declared
    elif declared is not None and declared != module.num_classes:
        raise ValueError(
            f"the DataModule has num_classes={declared} but the module has num_classes={module.num_classes}: "
            f"pass num_classes={declared} to the module (or leave it out: it is then taken from the data) and "
            f"give the backbone {declared} outputs."
        )
    mean, std = getattr(data, "mean", None), getattr(data, "std", None)
    if mean is not None and std is not None and module.model.mean is None:
        module.model.set_statistics(mean, std)
        taken.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    elif mean is not None and std is not None and module.pretrained_statistics:
        rank_zero_info(
            f"{type(module).__name__} normalizes with its pretrained backbone's own mean and std, not "
            f"{type(data).__name__}'s."
        )
    elif mean is not None and std is not None and not _same_statistics(module.model, mean, std):
        own = [module.model.mean.flatten().tolist(), module.model.std.flatten().tolist()]
        rank_zero_warn(
            f"the module normalizes with mean, std = {own} but {type(data).__name__} declares {[mean, std]}: the "
            "module's own are used. Leave mean and std out to take the data's."
        )
    if taken:
        module.hparams.update(taken)
        told = ", ".join(f"{key}={value}" for key, value in taken.items())
        rank_zero_info(f"{type(module).__name__} takes {told} from {type(data).__name__}.")


def _same_statistics(model: InputNormalization, mean: Sequence[float], std: Sequence[float]) -> bool:
    given, declared = torch.cat([model.mean.flatten(), model.std.flatten()]).cpu(), torch.tensor([*mean, *std])
    return given.shape == declared.shape and torch.allclose(given, declared)


def check_first_batch(x: Tensor, y: Tensor, num_classes: int) -> None:
    """Raise a ``ValueError`` naming the fix when the first training batch's images are not in [0, 1] or its labels
    not in [0, ``num_classes``)."""
    low, high = x.min().item(), x.max().item()
    if math.isnan(low) or math.isnan(high):
        raise ValueError(
            "the first training batch holds NaN pixels: training images must be in [0, 1]. Check how the dataset "
            "reads and converts its images."
        )
    if low < 0 or high > 1:
        raise ValueError(
            f"training images must be in [0, 1] pixel space, got values in [{low:.3g}, {high:.3g}]. Remove any "
            "Normalize transform from the data pipeline and pass mean/std to the module instead."
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"the first training batch has labels in [{low}, {high}] but num_classes={num_classes} (labels "
            f"must lie in [0, {num_classes - 1}]): set num_classes to the data's number of classes (the CLI "
            "links it from data.num_classes) and give the backbone as many outputs."
        )
