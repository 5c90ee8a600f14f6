"""What a training module writes into its checkpoints beside Lightning's: the classes that wrote it (checked on
loading) and one training image's shape (for ``export``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

MODULE_KEY = "freeadv_pl_module"
"""Checkpoint key of the classes that wrote it (most derived first), checked when a checkpoint is loaded."""
INPUT_SHAPE_KEY = "freeadv_pl_input_shape"
"""Checkpoint key of one training image's shape, for ``export``."""


def write_identity(checkpoint: dict[str, Any], module: LightningModule, base: type) -> None:
    """Record the classes of ``module`` from its own up to ``base``, and its input shape if known."""
    checkpoint[MODULE_KEY] = _lineage(type(module), base)
    if module.input_shape is not None:
        checkpoint[INPUT_SHAPE_KEY] = list(module.input_shape)


def read_identity(checkpoint: dict[str, Any], module: LightningModule, base: type) -> tuple[int, ...] | None:
    """The input shape the checkpoint records (None if none), after checking that a class of ``module``'s line (from
    its own up to ``base``) wrote it.

    Raises:
        ValueError: when another training algorithm wrote it, with the ways to load it.
    """
    saved, own = checkpoint.get(MODULE_KEY), _lineage(type(module), base)
    if saved and saved[0] not in own and own[0] not in saved:
        written_by, loader = saved[0].rsplit(".", 1)[-1], own[0].rsplit(".", 1)[-1]
        raise ValueError(
            f"this checkpoint was written by {saved[0]}, not by {own[0]} (or a parent or subclass of it): its "
            f"hyperparameters and training state belong to another training algorithm. Load it with "
            f"{written_by}.load_from_checkpoint, or in the CLI with the config of the run that wrote it. To "
            f"start a {loader} from its weights only, use "
            "module.load_state_dict(torch.load(path, weights_only=True)['state_dict'])."
        )
    shape = checkpoint.get(INPUT_SHAPE_KEY)
    return tuple(shape) if shape else None


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's Trainer, or None when it has none (``load_from_checkpoint``)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def _lineage(module_class: type, base: type) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in module_class.__mro__ if issubclass(c, base)]
