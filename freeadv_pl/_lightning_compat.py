"""Every read of Lightning's private API in freeadv_pl (and of the jsonargparse/argparse internals its CLI parser is
made of), in one place; ``tests/test_lightning_compat.py`` pins each one against the installed releases, so that a
release that changes them fails there first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer


def should_update_logs(trainer: Trainer) -> bool:
    """Whether the Trainer writes logged metrics after the current batch (every ``log_every_n_steps`` batches)."""
    return trainer._logger_connector.should_update_logs


def count_optimizer_step(optimizer: LightningOptimizer) -> None:
    """Advance ``trainer.global_step`` (and the optimizer-step profiler span) by one, as ``optimizer.step()`` does in
    manual optimization, for a step the caller took on the wrapped optimizer itself."""
    optimizer._on_before_step()
    optimizer._on_after_step()


def cli_class_path(hyperparameters: Mapping[str, Any]) -> str | None:
    """The model class a ``LightningCLI`` run recorded in its module's saved hyperparameters (None when it was not
    written by a LightningCLI)."""
    return hyperparameters.get("_class_path")


def cli_subcommand_entries(parser: Any) -> tuple[Any, list[Any]] | None:
    """The subcommands action of a ``LightningCLI`` parser (jsonargparse keeps the action ``add_subcommands()``
    returned as ``_subcommands_action``) and its per-subcommand ``--help`` entries (argparse's ``_choices_actions``),
    or None for a parser without subcommands."""
    action = getattr(parser, "_subcommands_action", None)
    return None if action is None else (action, action._choices_actions)


def resumes_after_last_batch(fit_loop_state: Mapping[str, Any]) -> bool:
    """Whether a fit loop's state (``trainer.fit_loop.state_dict()``, ``checkpoint["loops"]["fit_loop"]``) was saved
    after an epoch's last batch but before the epoch's end. Lightning resumes such a checkpoint as the end of that
    epoch without running the epoch's end: the next epoch starts from its first batch."""
    epochs = fit_loop_state["epoch_progress"]["current"]
    batches = fit_loop_state["epoch_loop.batch_progress"]
    return (
        epochs["started"] > epochs["processed"]
        and batches["is_last_batch"]
        and batches["current"]["processed"] == batches["current"]["ready"]
    )


def epoch_to_run(trainer: Trainer) -> tuple[int, bool]:
    """The epoch the fit loop runs next (the number Lightning passes to the training sampler's ``set_epoch``, which it
    does only after it has made a resumed fit's first iterator), and whether it starts afresh although the fit resumes
    a checkpoint (:func:`resumes_after_last_batch`)."""
    fresh = resumes_after_last_batch(trainer.fit_loop.state_dict())
    return trainer.fit_loop.epoch_progress.current.processed + fresh, fresh
