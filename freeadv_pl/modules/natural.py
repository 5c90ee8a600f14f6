"""Natural (non-adversarial) training: the baseline whose cost Free-m matches."""

from __future__ import annotations

from torch import Tensor

from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules.base import ClassifierModule


class NaturalModule(ClassifierModule):
    """Plain training: one optimizer step on the clean batch, one forward/backward pass per batch.

    Takes the arguments of :class:`ClassifierModule`.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> NaturalModule(SmallCNN(), num_classes=10).automatic_optimization
        False
    """

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        loss, logits = self.fit_step(x, y)
        self.log_training(loss, logits, y)
