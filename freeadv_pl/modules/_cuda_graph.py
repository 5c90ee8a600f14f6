"""A training step captured in one CUDA graph and replayed: ``FreeAdversarialModule(cuda_graph=True)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from freeadv_pl.modules._step_path import direct_step_blocker

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

WARMUP_REPLAYS = 3
"""Replays of the first batch run eagerly (on a side stream) before the capture: they let cuDNN choose its
algorithms and the optimizer create its state, as torch.cuda.graphs asks."""


def graph_blocker(module: LightningModule, base: type[LightningModule]) -> str | None:
    """None when the training step of ``module`` (a :class:`~freeadv_pl.modules.ClassifierModule`) can run as one
    captured CUDA graph in this fit, otherwise why not (``base``: the class whose per-step hooks are the package's own,
    see :func:`direct_step_blocker`)."""
    if module.device.type != "cuda":
        return f"training runs on {module.device.type}, not on a CUDA device"
    reason = direct_step_blocker(module.trainer, module, base)
    if reason is not None:
        return reason
    if module.compile_model:
        return "compile=True: choose one of compile and cuda_graph"
    optimizer = module.optimizers(use_pl_optimizer=False)
    # Optimizers with a `capturable` flag need it; SGD has none and captures in its fused form.
    groups = optimizer.param_groups
    if not all(group["capturable"] if "capturable" in group else group.get("fused") for group in groups):
        return (
            f"{type(optimizer).__name__} as configured cannot step inside a CUDA graph: use "
            "torch.optim.SGD(..., fused=True) (the default optimizer is, on a GPU) or Adam/AdamW(..., capturable=True)"
        )
    return None


class ReplayGraph:
    """A training step captured once in a CUDA graph and replayed, its inputs copied into static buffers
    (docs/design.md, "The replay in a CUDA graph"). It knows nothing of the algorithm: ``step(*inputs)`` is the
    module's own eager step (Free-m's replay), ``after(outputs)`` the module's host-side bookkeeping after each
    replay, and ``updated`` the positions of the inputs the step writes into, copied back after each batch.

    Args:
        optimizer: the (unwrapped) optimizer ``step`` steps, whose learning rates become device tensors.
        step: takes the static inputs and returns a tuple of tensors.
        after: called with the outputs after every replay.
        updated: indices of the tensor inputs ``step`` updates in place.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        step: Callable[..., tuple[Tensor, ...]],
        after: Callable[[tuple[Tensor, ...]], None],
        updated: Sequence[int] = (),
    ) -> None:
        self.optimizer = optimizer
        self.step = step
        self.after = after
        self.updated = tuple(updated)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []  # the static inputs each batch copies into
        self.outputs: tuple[Tensor, ...] = ()
        self.hyperparameters: list[dict[str, Any]] = []
        self.grads: list[Tensor | None] = []

    def fits(self, x: Tensor) -> bool:
        """Whether a batch whose first input is ``x`` has the captured shape and dtype."""
        return not self.inputs or (self.inputs[0].shape == x.shape and self.inputs[0].dtype == x.dtype)

    def run(self, inputs: Sequence[Tensor | float], times: int) -> tuple[Tensor, ...]:
        """``times`` replays of the step on ``inputs`` (numbers become 0-dim tensors on the first tensor's device).
        Returns copies of the last replay's outputs."""
        device = next(value for value in inputs if isinstance(value, Tensor)).device
        if not self.inputs:
            self.inputs = [
                value.clone() if isinstance(value, Tensor) else torch.tensor(float(value), device=device)
                for value in inputs
            ]
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
            self.hyperparameters = _fixed_hyperparameters(self.optimizer)
        for static, value in zip(self.inputs, inputs, strict=True):
            if isinstance(value, Tensor):
                static.copy_(value)
            else:
                static.fill_(value)
        done = 0 if self.graph is not None else self._warm_up_and_capture(times)
        for _ in range(done, times):
            self.graph.replay()
            self._after_replay()
        for index in self.updated:
            inputs[index].copy_(self.inputs[index])
        return tuple(output.clone() for output in self.outputs)

    def restore_gradients(self) -> None:
        """Point each parameter's ``.grad`` at the captured gradient again (after an eager batch replaced it)."""
        if not self.grads:
            return
        for parameter, grad in zip(self._parameters(), self.grads, strict=True):
            parameter.grad = grad

    def _warm_up_and_capture(self, times: int) -> int:
        warmup = min(WARMUP_REPLAYS, times)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.outputs = self.step(*self.inputs)
                self._after_replay()
        torch.cuda.current_stream().wait_stream(stream)
        self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the gradients it writes
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # loader threads may use CUDA
                self.outputs = self.step(*self.inputs)
        except RuntimeError as error:
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed ({error}): an operation of the model, the loss "
                "or the optimizer cannot be captured (a host synchronisation, a data-dependent shape). Set "
                "cuda_graph=False."
            ) from error
        self.grads = [parameter.grad for parameter in self._parameters()]
        return warmup

    def _after_replay(self) -> None:
        self.after(self.outputs)
        if _fixed_hyperparameters(self.optimizer) != self.hyperparameters:
            raise ValueError(
                "cuda_graph=True holds the optimizer's hyperparameters other than the learning rate fixed, but the LR "
                f"scheduler changed them ({self.hyperparameters} → {_fixed_hyperparameters(self.optimizer)}): "
                "schedule the learning rate alone (e.g. OneCycleLR(..., cycle_momentum=False)) or set "
                "cuda_graph=False."
            )

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def _fixed_hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr") and not isinstance(v, Tensor)}
        for group in optimizer.param_groups
    ]


def float_learning_rates(checkpoint: dict[str, Any]) -> None:
    """Write the checkpoint's learning rates as numbers, as an eager run does, where the graph made them tensors."""
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            if isinstance(group.get("lr"), Tensor):
                group["lr"] = group["lr"].item()
    for scheduler in checkpoint.get("lr_schedulers", []):
        if isinstance(scheduler, dict) and "_last_lr" in scheduler:
            scheduler["_last_lr"] = [v.item() if isinstance(v, Tensor) else v for v in scheduler["_last_lr"]]
