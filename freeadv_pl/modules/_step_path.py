"""When a module may take its optimizer steps itself instead of through Lightning's per-step machinery."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

_PER_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_step_blocker(trainer: Trainer, module: LightningModule, base: type[LightningModule]) -> str | None:
    """None when every optimizer step of ``module`` may run as plain ``loss.backward()`` and the wrapped optimizer's
    ``step()``: one device, no loss scaler, and no per-step hook in a callback or in ``module`` beyond ``base``
    (docs/design.md, "The direct optimizer step"); otherwise the reason why not."""
    strategy = type(trainer.strategy)
    if strategy is not SingleDeviceStrategy:
        return f"the {strategy.__name__} strategy takes part in every step (gradient synchronisation)"
    plugin = trainer.precision_plugin
    if type(plugin) is not Precision and not (type(plugin) is MixedPrecision and plugin.scaler is None):
        return f"precision={trainer.precision!r} takes part in every step ({type(plugin).__name__}, loss scaling)"
    for callback in trainer.callbacks:
        for hook in _PER_STEP_HOOKS:
            if is_overridden(hook, callback, Callback):
                return f"the callback {type(callback).__name__} implements {hook}"
    for hook in (*_PER_STEP_HOOKS, "backward"):
        if getattr(type(module), hook) is not getattr(base, hook):
            return f"{type(module).__name__} overrides {hook}"
    return None
