"""Switching a model's train/eval mode, or its parameters' ``requires_grad``, for a while, then giving each back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def temporary_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train (``training=True``) or eval mode, then give every submodule back its own mode.

    ``model.train(was_training)`` would not do: it would also flip submodules that the user had set apart (a
    frozen batch-norm kept in eval mode inside a model in training, say).
    """
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in saved:
            module.training = was_training


@contextmanager
def no_parameter_gradients(model: nn.Module) -> Iterator[None]:
    """The parameters of ``model`` need no gradient for a while (an attack's ``backward`` would accumulate one into
    them); each gets its own ``requires_grad`` back."""
    saved = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in saved:
            parameter.requires_grad_(requires_grad)
