"""What a training module writes into its checkpoints beside Lightning's: the classes that wrote it (checked on
loading), one training image's shape (for ``export``) and, under the command line, the configuration of the
arguments that are objects (the backbone, the optimizer and the LR scheduler), so that ``load_from_checkpoint``
rebuilds the module from the path alone."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
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


BUILT_ARGUMENTS = ("backbone", "optimizer", "lr_scheduler")
"""The module arguments that are objects: ``save_hyperparameters`` leaves them out, the command line records their
configuration (:func:`record_build_config`)."""
NOT_RECORDED = ("weights",)
"""Backbone arguments left out of the recorded configuration: the checkpoint holds the trained weights, and a
pretrained file or a download need not exist where the checkpoint is loaded."""


def record_build_config(module: LightningModule, model_config: Mapping[str, Any]) -> None:
    """Record in ``module.hparams`` the configuration of each of :data:`BUILT_ARGUMENTS` that ``model_config`` (the
    model's ``{"class_path": ..., "init_args": {...}}`` as the command line parsed it) gives, so that
    ``load_from_checkpoint(path)`` and LightningCLI rebuild them. The backbone's ``weights`` are not recorded."""
    init_args = model_config.get("init_args") or {}
    recorded = {name: init_args[name] for name in BUILT_ARGUMENTS if isinstance(init_args.get(name), Mapping)}
    backbone_args = (recorded.get("backbone") or {}).get("init_args")
    if isinstance(backbone_args, Mapping) and any(name in backbone_args for name in NOT_RECORDED):
        kept = {key: (None if key in NOT_RECORDED else value) for key, value in backbone_args.items()}
        recorded["backbone"] = {**recorded["backbone"], "init_args": kept}
    # Plain JSON types only: checkpoints load with weights_only=True, which refuses other objects (paths, ...).
    module.hparams.update(json.loads(json.dumps(recorded, default=_as_text)))


def _as_text(value: Any) -> str:
    """A configuration value as the command line writes it: a class or function (ResNet's ``block``) by its import
    path, anything else (a path) as its text."""
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)


def rebuild_error(module_class: type, checkpoint_path: Any, error: Exception) -> ValueError:
    """The error of a ``load_from_checkpoint`` that could not rebuild the module's backbone from the checkpoint (one
    written outside ``freeadv_pl fit``, or before it recorded its backbone), with the two ways to load it."""
    return ValueError(
        f"{module_class.__name__}.load_from_checkpoint({str(checkpoint_path)!r}) cannot rebuild the model: the "
        "checkpoint records no backbone configuration (those of `freeadv_pl fit` do, from freeadv_pl 0.5 on; "
        f"{type(error).__name__}: the backbone is missing). Pass the backbone it was trained with, e.g. "
        f"{module_class.__name__}.load_from_checkpoint(path, backbone=SmallCNN(in_channels=1)), or evaluate it with "
        "`freeadv_pl evaluate --model PATH`, which rebuilds it from the run's config.yaml."
    )


def imported_class(class_path: str) -> type | None:
    """The class named ``class_path`` if its module is already imported (a checkpoint's text imports nothing)."""
    module, _, name = class_path.rpartition(".")
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's Trainer, or None when it has none (``load_from_checkpoint``)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def _lineage(module_class: type, base: type) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in module_class.__mro__ if issubclass(c, base)]
