"""Natural (non-adversarial) training: the baseline whose cost Free-m matches."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules._checks import TRADES_ELSEWHERE, refuse_options
from freeadv_pl.modules.base import ClassifierModule


class NaturalModule(ClassifierModule):
    """Plain training: one optimizer step on the clean batch, one forward/backward pass per batch.

    Takes the arguments of :class:`ClassifierModule`.

    Raises:
        ValueError: when given an adversarial option (``loss``, ``trades_beta``, ``norm``, ``epsilon``): it trains on
            clean images only.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> NaturalModule(SmallCNN(), num_classes=10).automatic_optimization
        False
    """

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, **kwargs: Any) -> None:
        clean_only = "NaturalModule trains on clean images only, without an attack or a training loss of its own. "
        refuse_options(
            "NaturalModule",
            kwargs,
            {
                "loss": clean_only + TRADES_ELSEWHERE,
                "trades_beta": clean_only + TRADES_ELSEWHERE,
                "norm": clean_only + "Give the evaluation its norm: RobustEvaluation(norm='l2', epsilon=...).",
                "epsilon": clean_only + "Give the evaluation its radius: RobustEvaluation(epsilon=...).",
            },
        )
        super().__init__(backbone, num_classes, **kwargs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        loss, logits = self.fit_step(x, y)
        self.log_training(loss, logits, y)
