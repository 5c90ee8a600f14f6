"""Free-m's replay captured in one CUDA graph: ``FreeAdversarialModule(cuda_graph=True)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from freeadv_pl.modules._perturbation import step_delta
from freeadv_pl.modules._step_path import direct_step_blocker

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

    from freeadv_pl.modules.free import FreeAdversarialModule

WARMUP_REPLAYS = 3
"""Replays of the first batch run eagerly (on a side stream) before the capture: they let cuDNN choose its
algorithms and the optimizer create its state, as torch.cuda.graphs asks."""


def graph_blocker(module: FreeAdversarialModule, base: type[LightningModule]) -> str | None:
    """None when ``module``'s replays can run as one captured CUDA graph in this fit, otherwise why not (``base``: the
    class whose per-step hooks are the package's own, see :func:`direct_step_blocker`)."""
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
    """One Free-m replay captured once and replayed m times per batch, the batch copied into static buffers
    (docs/design.md, "The replay in a CUDA graph"); :meth:`fits` says whether a batch has the captured shape."""

    def __init__(self, module: FreeAdversarialModule) -> None:
        self.module = module
        self.optimizer: Optimizer = module.optimizers(use_pl_optimizer=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []  # x, y, δ, ε, ε_step: what each batch copies in
        self.outputs: tuple[Tensor, Tensor, Tensor] | None = None  # loss, logits, finiteness flag
        self.hyperparameters: list[dict[str, Any]] = []
        self.grads: list[Tensor | None] = []

    def fits(self, x: Tensor) -> bool:
        return not self.inputs or (self.inputs[0].shape == x.shape and self.inputs[0].dtype == x.dtype)

    def run(self, x: Tensor, y: Tensor, delta: Tensor, epsilon: float, step_size: float) -> tuple[Tensor, Tensor]:
        """The batch's m replays; ``delta`` is updated in place. Returns the last replay's loss and logits."""
        if not self.inputs:
            self.inputs = [x.clone(), y.clone(), delta.clone(), x.new_tensor(epsilon), x.new_tensor(step_size)]
            for group in self.optimizer.param_groups:
                if not isinstance(group["lr"], Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=x.device)
            self.hyperparameters = _fixed_hyperparameters(self.optimizer)
        for static, value in zip(self.inputs, (x, y, delta), strict=False):
            static.copy_(value)
        self.inputs[3].fill_(epsilon)
        self.inputs[4].fill_(step_size)
        done = 0 if self.graph is not None else self._warm_up_and_capture()
        for _ in range(done, self.module.replays):
            self.graph.replay()
            self._after_replay()
        delta.copy_(self.inputs[2])
        loss, logits, _ = self.outputs
        return loss.clone(), logits.clone()

    def restore_gradients(self) -> None:
        """Point each parameter's ``.grad`` at the captured gradient again (after an eager batch replaced it)."""
        if not self.grads:
            return
        for parameter, grad in zip(self._parameters(), self.grads, strict=True):
            parameter.grad = grad

    def _warm_up_and_capture(self) -> int:
        warmup = min(WARMUP_REPLAYS, self.module.replays)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._replay()
                self._after_replay()
        torch.cuda.current_stream().wait_stream(stream)
        self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the gradients it writes
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # loader threads may use CUDA
                self._replay()
        except RuntimeError as error:
            raise RuntimeError(
                f"capturing Free-m's replay in a CUDA graph failed ({error}): an operation of the model or the "
                "optimizer cannot be captured (a host synchronisation, a data-dependent shape). Set cuda_graph=False."
            ) from error
        self.grads = [parameter.grad for parameter in self._parameters()]
        return warmup

    def _replay(self) -> None:
        x, y, delta, epsilon, step_size = self.inputs
        module = self.module
        self.optimizer.zero_grad(set_to_none=True)
        leaf = delta.clone().requires_grad_(True)
        logits = module.model(torch.clamp(x + leaf, 0.0, 1.0))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        finite = torch.isfinite(loss.detach())
        module.on_before_optimizer_step(self.optimizer)
        self.optimizer.step()
        with torch.no_grad():
            step_delta(leaf, step_size, epsilon, finite if module._nonfinite.guard_updates else None, delta)
        self.outputs = (loss.detach(), logits.detach(), finite)

    def _after_replay(self) -> None:
        self.module._after_optimizer_step(self.outputs[2].clone())
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
