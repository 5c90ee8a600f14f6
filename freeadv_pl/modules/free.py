"""Free adversarial training, Algorithm 2 ("Free-m") of Shafahi et al., NeurIPS 2019."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.losses import TrainingLoss, training_loss
from freeadv_pl.modules._cuda_graph import ReplayGraph, graph_blocker
from freeadv_pl.modules._delta_bank import PerturbationBank, require_index, training_set_shape
from freeadv_pl.modules._perturbation import StoredPerturbation
from freeadv_pl.modules.base import ClassifierModule
from freeadv_pl.threat_models import Norm, threat_model


class FreeAdversarialModule(ClassifierModule):
    """Free-m adversarial training (Algorithm 2): each minibatch is replayed m times, and every replay's single
    backward pass gives both the weight gradient (for one optimizer step) and the gradient of the perturbation δ.

    Per replay: ``x_adv = clamp(x + δ[:B], 0, 1)``; ``loss = CE(f(x_adv), y)``; one backward; the optimizer steps;
    ``δ ← clip(δ + step_size · sign(∇_δ loss), -ε, ε)``. In L2 (``norm="l2"``) δ's step is ``step_size · ∇ / ‖∇‖₂``
    and its projection onto the L2 ball, per image. With ``loss="trades"`` each replay also runs the model on the clean
    batch and the loss is TRADES's ``CE(f(x), y) + β · KL(f(x) ‖ f(x_adv))``: δ enters only through the KL term, so the
    same single backward steps δ up TRADES's inner objective. δ is kept across minibatches and epochs (:attr:`delta`), one
    per process, and saved in checkpoints. Free-m for N/m epochs costs what natural training does in N epochs;
    ``trainer.global_step`` counts optimizer steps (m per batch). The design, δ under DDP and resuming are in
    docs/design.md, "δ, the perturbation Free-m keeps". Without a CUDA graph it logs per epoch ``train/grad_alignment``
    (consecutive replays' δ gradients) and ``train/attack_gain`` (each batch's last replay's loss over its first's),
    which :class:`~freeadv_pl.CatastrophicOverfittingGuard` can watch.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        replays: m, the number of replays of each minibatch (≥ 1).
        epsilon: the bound ε of δ in the threat model's norm, in pixel units (a float or a string like ``"8/255"``).
        step_size: the δ step ε_step; None means ε, as in the paper.
        norm: the threat model, ``"linf"`` (the paper's) or ``"l2"`` (:mod:`freeadv_pl.threat_models`).
        loss: the training loss, ``"ce"`` (the paper's) or ``"trades"``, or a
            :class:`~freeadv_pl.losses.TrainingLoss` of your own.
        trades_beta: β of TRADES (the authors' 6.0); used with ``loss="trades"``.
        delta_memory: ``"batch"``: δ belongs to a position in the batch, as in the paper. ``"example"``: one δ per
            training image (a bank, :attr:`delta`), which comes back with its image the next epoch; the batches must be
            ``(x, y, index)`` (``VisionDataModule(return_index=True)``). See docs/design.md, "Two memories".
        delta_bank: where the bank lives: ``"device"`` (the training device) or ``"cpu"`` (host memory, pinned on a
            GPU run; each batch's rows travel to the device and back). Checked to fit before training.
        delta_start_noise: ρ; at each batch's start, δ ← Π(δ + ρ·ε·u), u the threat model's random start in the unit
            ball (U(−1, 1) per pixel in L∞) and Π the projection onto the ε-ball: a random restart mixed into the
            stored δ (0: off).
        delta_reset_every: set the stored δ (batch or bank) to zero at the start of every k-th epoch (None: never).
        epsilon_warmup_epochs: ε and ε_step ramp linearly from ~0 to their values over the first k epochs, batch by
            batch (0: off).
        cuda_graph: on one CUDA device, capture one replay in a CUDA graph at the first batch and replay it m times
            per batch. Needs an optimizer that can step inside a graph (the default optimizer on a GPU, or Adam/AdamW
            with ``capturable=True``); where it cannot be captured the replays run eagerly, with one warning. See
            docs/design.md, "The replay in a CUDA graph".
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        ValueError: if ``replays`` < 1, ε is outside [0, 1] (L∞) or negative or not finite (L2), ``step_size`` is not
            in (0, 1] (L∞) or not > 0 (L2), on an unknown ``norm``, ``loss``, ``delta_memory`` or ``delta_bank``, a
            negative ``trades_beta``, a ``delta_start_noise`` outside [0, 1], a ``delta_reset_every`` < 1, a
            negative ``epsilon_warmup_epochs``; with ``delta_memory="example"``, at the start of ``fit`` when the bank
            does not fit in memory, and at the first batch when it is ``(x, y)``; with ``cuda_graph=True``, when the LR
            scheduler changes another hyperparameter than the learning rate (e.g. ``OneCycleLR``'s momentum).
        RuntimeError: with ``cuda_graph=True``, when the replay cannot be captured.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = FreeAdversarialModule(SmallCNN(), num_classes=10, replays=4, epsilon="8/255")
        >>> module.delta is None
        True
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int | None = None,
        replays: int = 8,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        norm: Norm = "linf",
        loss: Literal["ce", "trades"] | TrainingLoss = "ce",
        trades_beta: float = 6.0,
        delta_memory: Literal["batch", "example"] = "batch",
        delta_bank: Literal["device", "cpu"] = "device",
        delta_start_noise: float = 0.0,
        delta_reset_every: int | None = None,
        epsilon_warmup_epochs: int = 0,
        cuda_graph: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.replays = check_int(replays, "replays", minimum=1)
        self.threat = threat_model(norm)
        self.norm = self.threat.norm
        self.epsilon = self.threat.radius(epsilon, "epsilon")
        self.step_size = (
            self.epsilon if step_size is None else self.threat.radius(step_size, "step_size", allow_zero=False)
        )
        self.training_loss = training_loss(loss, trades_beta)
        self.delta_memory = check_choice(delta_memory, "delta_memory", ("batch", "example"))
        self.delta_start_noise = as_pixel_fraction(delta_start_noise, "delta_start_noise")
        self.delta_reset_every = (
            None if delta_reset_every is None else check_int(delta_reset_every, "delta_reset_every", minimum=1)
        )
        self.epsilon_warmup_epochs = check_int(epsilon_warmup_epochs, "epsilon_warmup_epochs", minimum=0)
        self._delta = StoredPerturbation()
        self._bank = PerturbationBank(check_choice(delta_bank, "delta_bank", ("device", "cpu")))
        self.cuda_graph = cuda_graph
        self._graph: ReplayGraph | None = None

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: one per replay; two with a loss that also reads the clean logits
        (TRADES: the clean and the adversarial forward, and the one backward through both)."""
        return self.replays * (2 if self.training_loss.needs_clean else 1)

    def kept_perturbation(self) -> StoredPerturbation | PerturbationBank:
        return self._bank if self.delta_memory == "example" else self._delta

    @property
    def delta(self) -> Tensor | None:
        """The stored perturbation δ, or None before training: batch-sized with ``delta_memory="batch"``, the bank
        ``(len(training set), *image)`` with ``"example"``."""
        return self._bank.tensor if self.delta_memory == "example" else self._delta.tensor

    def on_train_start(self) -> None:
        super().on_train_start()
        self._graph = None
        if self.cuda_graph:
            reason = graph_blocker(self, ClassifierModule)
            if reason is None:
                self._graph = ReplayGraph(
                    self.optimizers(use_pl_optimizer=False),
                    functools.partial(self._replay, step=self._optimizer_step),
                    after=lambda outputs: self._after_optimizer_step(outputs[3].clone()),
                    updated=(2,),
                )
            else:
                rank_zero_warn(f"cuda_graph=True: {reason}; Free-m's replays run eagerly.")
        if self.delta_memory == "example":
            self._bank.allocate(*training_set_shape(self.trainer, "delta_memory='example'"), self.trainer)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if self.delta_reset_every is not None and epoch > 0 and epoch % self.delta_reset_every == 0:
            self._bank.reset()
            self._delta.reset()

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        x, y, index, crop_flip = unpack_batch(batch)
        scale = self._warmup_scale(batch_idx)
        epsilon, step_size = scale * self.epsilon, scale * self.step_size
        if self.delta_memory == "example":
            index = require_index(index, "delta_memory='example'")
            delta, stored = self._bank.rows(index, x, crop_flip)
        else:
            delta = self._delta.for_batch(x)  # a view of δ[:B]: writing into it updates the stored δ
        if self.delta_start_noise > 0:
            noise = self.threat.random_start(delta, self.delta_start_noise * epsilon, self.random_generator(delta))
            delta.copy_(self.threat.project(delta + noise, epsilon))
        if self._graph is not None and self._graph.fits(x):
            loss, logits = self._graph.run([x, y, delta, epsilon, step_size], self.replays)[:2]
        else:
            built = None  # the previous replay's δ gradient, which built this replay's δ
            for replay in range(self.replays):
                loss, logits, grad, _ = self._replay(x, y, delta, epsilon, step_size)
                with torch.no_grad():
                    if replay == 0:
                        first_loss = loss.detach()
                    elif replay == self.replays - 1:
                        self._attack_gain.add(first_loss, loss)
                    if built is not None:
                        self._alignment.add(built, grad)
                    built = grad
            if self._graph is not None:  # a batch of another shape (the last, smaller one) ran eagerly
                self._graph.restore_gradients()
        if self.delta_memory == "example":
            self._bank.store(index, delta, stored, crop_flip)
        self.log_training(loss, logits, y)

    def _replay(
        self,
        x: Tensor,
        y: Tensor,
        delta: Tensor,
        epsilon: float | Tensor,
        step_size: float | Tensor,
        step: Callable[..., tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One replay of Algorithm 2, for the eager loop and the CUDA graph alike: the optimizer step at
        ``clamp(x + δ, 0, 1)`` (``step``: :meth:`fit_step` by default; inside the graph :meth:`_optimizer_step`, whose
        host-side bookkeeping the graph runs after each replay), then δ's step and projection written into ``delta``, kept as it was where the loss or δ's
        gradient is not finite and such steps are skipped. Returns the loss, the logits, δ's gradient and the loss's
        finiteness flag (device tensors: no host synchronisation)."""
        leaf = delta.clone().requires_grad_(True)
        take_step = self.fit_step if step is None else step
        loss, logits = take_step(torch.clamp(x + leaf, 0.0, 1.0), y, clean=x)
        finite = torch.isfinite(loss.detach())
        with torch.no_grad():
            grad = leaf.grad
            stepped = self.threat.project(self.threat.ascend(leaf, grad, step_size), epsilon)
            if self._nonfinite.guard_updates:
                stepped = torch.where(finite & torch.isfinite(grad).all(), stepped, leaf)
            delta.copy_(stepped)
        return loss.detach(), logits.detach(), grad, finite

    def finish_epoch(self) -> None:
        super().finish_epoch()
        self._bank.synchronise(self.trainer)

    def _warmup_scale(self, batch_idx: int) -> float:
        """The share of ε and ε_step in force: linear from 1/(k·batches) at the first batch to 1 after k epochs."""
        if self.epsilon_warmup_epochs == 0:
            return 1.0
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                "epsilon_warmup_epochs needs a training DataLoader with a length (the ramp counts batches per epoch)"
            )
        done = self.current_epoch * batches + batch_idx + 1
        return min(1.0, done / (self.epsilon_warmup_epochs * batches))
