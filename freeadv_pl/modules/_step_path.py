"""When a module may take its optimizer steps itself instead of through Lightning's per-step machinery."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

_PER_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def direct_step_blocker(trainer: Trainer, module: LightningModule, base: type[LightningModule]) -> str | None:
    """None when every optimizer step of ``module`` may run as ``loss.backward()`` and ``optimizer.step()`` on the
    wrapped optimizer, which is what Lightning's ``manual_backward`` and ``LightningOptimizer.step`` reduce to here;
    otherwise the reason why not.

    That holds on one device (no gradient all-reduce), in a precision without a loss scaler (``32-true``,
    ``bf16-mixed``), when no callback implements a per-step hook (``on_before_backward``, ``on_after_backward``,
    ``on_before_optimizer_step``) and ``module`` overrides none of them, nor ``backward``, beyond ``base``.
    """
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
