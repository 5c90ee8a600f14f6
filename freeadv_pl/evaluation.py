"""Accuracy of a model on a dataset, clean or under an attack (pure PyTorch, no Lightning)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from freeadv_pl._modes import temporary_mode

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""Maps (model, images, labels) to adversarial images, e.g. ``functools.partial(pgd, epsilon=0.1, ...)``."""


def count_correct(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], attack: Attack | None = None
) -> tuple[int, int]:
    """Count the examples ``model`` classifies correctly, on clean inputs or on ``attack``'s adversarial ones.

    The model runs in evaluation mode (its modes are restored afterwards), on the device of its parameters.

    Args:
        model: maps images in [0, 1] to logits.
        batches: ``(images, labels)`` pairs, e.g. a DataLoader.
        attack: None for clean accuracy, otherwise a function returning adversarial images.

    Returns:
        ``(correct, total)``.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> count_correct(model, [(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))])[1]
        3
    """
    device = next(model.parameters()).device
    correct = total = 0
    with temporary_mode(model, training=False):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if attack is not None:
                x = attack(model, x, y)
            with torch.no_grad():
                correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct, total
