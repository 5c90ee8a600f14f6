"""What a NaN or infinite training loss does (``on_nonfinite_loss``), in one object the modules hold."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from freeadv_pl._checks import check_choice


class NonFiniteLosses:
    """One device-side finiteness flag per optimizer step, acted on as ``policy`` says (docs/design.md, "Non-finite
    losses").

    Args:
        policy: ``"raise"`` or ``"skip"``.
    """

    def __init__(self, policy: str) -> None:
        self.policy = check_choice(policy, "on_nonfinite_loss", ("raise", "skip"))
        self.flags: list[Tensor] = []  # one per optimizer step of the current batch
        self.zero_gradients = False  # "skip" without a loss scaler
        self.guard_updates = True  # whether a replay's δ update must check finiteness ("skip", or fp16's scaler)
        self._skipped: Tensor | int = 0  # on the device until the epoch's end

    def start(self, trainer: Trainer) -> None:
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16's GradScaler
        self.zero_gradients = self.policy == "skip" and not scaled
        # With "raise" and no scaler a run stops at the batch's end, so no update can follow a non-finite step.
        self.guard_updates = self.policy == "skip" or scaled
        self.flags, self._skipped = [], 0

    def record(self, finite: Tensor) -> None:
        self.flags.append(finite)

    def update_guard(self) -> Tensor | None:
        """The last step's flag where a perturbation update must check it, else None."""
        return self.flags[-1] if self.guard_updates else None

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Zero all of ``optimizer``'s gradients if any element is NaN or inf ("skip"), without a host synchronisation."""
        if not self.zero_gradients:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            nonfinite = ~torch.isfinite(torch.stack([grad.sum() for grad in grads]).sum())  # NaN/inf if any term is
            for grad in grads:
                grad.masked_fill_(nonfinite, 0.0)

    def end_batch(self, module: LightningModule, batch_idx: int) -> None:
        """Count ("skip") or raise a ``FloatingPointError`` ("raise", when a step's loss was not finite anywhere)."""
        if not self.flags:
            return
        finite = torch.stack(self.flags)
        self.flags = []
        if self.policy == "skip":
            self._skipped = self._skipped + (~finite).sum()
        elif not module.trainer.strategy.reduce_boolean_decision(bool(finite.all()), all=True):
            raise FloatingPointError(_message(module, finite, batch_idx))

    def end_epoch(self, module: LightningModule) -> None:
        """With ``"skip"``, log the epoch's count (summed over processes) as ``train/skipped_steps`` and warn if > 0."""
        if self.policy != "skip":
            return
        skipped = torch.as_tensor(self._skipped, dtype=torch.float32, device=module.device)
        self._skipped = 0
        skipped = module.trainer.strategy.reduce(skipped, reduce_op="sum")
        module.log("train/skipped_steps", skipped)
        if skipped > 0:  # one host synchronisation per epoch
            rank_zero_warn(
                f"on_nonfinite_loss='skip': {int(skipped)} optimizer step(s) of epoch {module.current_epoch} had a "
                "non-finite loss and were skipped (summed over processes)."
            )


def _message(module: Any, finite: Tensor, batch_idx: int) -> str:
    where = f"epoch {module.current_epoch}, batch_idx {batch_idx}"
    if finite.all():
        where += " on another process"
    else:
        first = int((~finite).nonzero()[0])
        step = module.trainer.global_step - len(finite) + first
        where += f", trainer.global_step {step} (optimizer step {first + 1} of the batch's {len(finite)})"
    return (
        f"the training loss is not finite (NaN or inf) at {where}. Look for NaN or inf in that batch's images, "
        "lower the learning rate or set gradient_clip_norm; or set on_nonfinite_loss='skip' to skip such steps "
        "(and their δ update) and count them."
    )
