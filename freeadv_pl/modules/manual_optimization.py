"""Manual optimization as every training module takes it: the default optimizer, the optimizer step (one per
replay, on either of the two paths of docs/design.md, "The direct optimizer step"), the LR scheduler stepped per
optimizer step or per epoch, and the Trainer settings that manual optimization cannot honour."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from freeadv_pl._checks import check_choice
from freeadv_pl._lightning_compat import count_optimizer_step
from freeadv_pl.modules._step_path import direct_step_blocker

__all__ = ["check_trainer_for_manual_optimization", "default_optimizer"]

_SGD_FUSES = "fused" in inspect.signature(SGD).parameters  # torch >= 2.3


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """SGD with the paper's CIFAR settings: lr 0.1, momentum 0.9, weight decay 2e-4; fused (one kernel per step, and
    steppable inside a CUDA graph) when every parameter is on a CUDA device."""
    params = list(params)
    tensors = [p for p in params if isinstance(p, Tensor)]
    fused = _SGD_FUSES and bool(tensors) and all(p.is_cuda for p in tensors)
    return SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4, **({"fused": True} if fused else {}))


class OptimizerSteps:
    """A module's optimizer and LR scheduler: built by :meth:`configure`, taken from Lightning at the start of each
    fit (:meth:`start`), stepped once per replay (:meth:`step`, :meth:`after_step`) and at each epoch's end
    (:meth:`end_epoch`)."""

    def __init__(self, interval: str) -> None:
        self.interval = check_choice(interval, "lr_scheduler_interval", ("step", "epoch"))
        self.direct = False  # decided at the start of fit (direct_step_blocker)
        self._optimizer: Any = None  # the LightningOptimizer of this fit
        self._scheduler: Any = None  # and its LR scheduler (None without one)

    def configure(
        self,
        optimizer_factory: Callable[[Iterable[Any]], Optimizer],
        scheduler_factory: Callable[[Optimizer], Any] | None,
        params: Iterable[Any],
    ) -> Any:
        """What ``configure_optimizers`` returns: the optimizer, with its scheduler and this interval if there is one.

        Raises:
            ValueError: on a ``ReduceLROnPlateau`` scheduler, which needs a metric the module does not give it.
        """
        optimizer = optimizer_factory(params)
        if scheduler_factory is None:
            return optimizer
        scheduler = scheduler_factory(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(  # noqa: TRY004  (a valid scheduler type, unsupported here: a value error for users)
                "lr_scheduler=ReduceLROnPlateau is not supported: the module steps its scheduler itself, without a "
                "metric. Use a step- or epoch-indexed schedule such as MultiStepLR or OneCycleLR."
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}

    def start(self, module: LightningModule, base: type[LightningModule]) -> None:
        """Take this fit's optimizer and scheduler, and decide the step's path (``base``: the class whose hooks do not
        stand in the direct step's way)."""
        self._optimizer = module.optimizers()
        self._scheduler = module.lr_schedulers()
        self.direct = direct_step_blocker(module.trainer, module, base) is None

    def step(self, module: LightningModule, loss: Tensor) -> None:
        """Zero the gradients, back-propagate ``loss`` once and step the optimizer: directly (the module's
        ``on_before_optimizer_step``, then the optimizer) or through Lightning's ``manual_backward`` and
        ``LightningOptimizer.step``."""
        optimizer = self._optimizer or module.optimizers()
        optimizer.zero_grad()
        if self.direct:
            loss.backward()
            module.on_before_optimizer_step(optimizer.optimizer)
            optimizer.optimizer.step()
        else:
            module.manual_backward(loss)
            optimizer.step()

    def after_step(self) -> None:
        """The host-side part of a step, kept out of a CUDA graph: advance ``trainer.global_step`` after a direct step,
        and step a per-step scheduler."""
        if self.direct:
            count_optimizer_step(self._optimizer)
        if self.interval == "step":
            self._step_scheduler()

    def end_epoch(self) -> None:
        """Step a per-epoch scheduler."""
        if self.interval == "epoch":
            self._step_scheduler()

    def _step_scheduler(self) -> None:
        if self._scheduler is not None:
            self._scheduler.step()


def check_trainer_for_manual_optimization(trainer: Trainer) -> None:
    """Reject Trainer settings that manual optimization cannot honour, with the fix in the message.

    Lightning raises too, later and in general terms; the CLI calls this before ``fit`` for a clearer answer.

    Raises:
        ValueError: if ``accumulate_grad_batches`` > 1 or ``gradient_clip_val`` is set.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported: freeadv_pl modules "
            "use manual optimization and take one optimizer step per replay. Remove accumulate_grad_batches (or set "
            "it to 1) and raise data.batch_size instead."
        )
    if trainer.gradient_clip_val is not None:
        raise ValueError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} is not supported: freeadv_pl modules use manual "
            "optimization, where Lightning does not clip gradients. Remove gradient_clip_val from the trainer and set "
            f"the module's gradient_clip_norm={trainer.gradient_clip_val} instead (model.init_args.gradient_clip_norm)."
        )
