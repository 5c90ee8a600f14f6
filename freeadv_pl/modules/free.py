"""Free adversarial training, Algorithm 2 ("Free-m") of Shafahi et al., NeurIPS 2019."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules._cuda_graph import ReplayGraph, graph_blocker
from freeadv_pl.modules._delta_bank import PerturbationBank, require_index, training_set_shape
from freeadv_pl.modules._perturbation import StoredPerturbation, step_delta
from freeadv_pl.modules.base import ClassifierModule


class FreeAdversarialModule(ClassifierModule):
    """Free-m adversarial training (Algorithm 2): each minibatch is replayed m times, and every replay's single
    backward pass gives both the weight gradient (for one optimizer step) and the gradient of the perturbation δ.

    Per replay: ``x_adv = clamp(x + δ[:B], 0, 1)``; ``loss = CE(f(x_adv), y)``; one backward; the optimizer steps;
    ``δ ← clip(δ + step_size · sign(∇_δ loss), -ε, ε)``. δ is kept across minibatches and epochs (:attr:`delta`), one
    per process, and saved in checkpoints. Free-m for N/m epochs costs what natural training does in N epochs;
    ``trainer.global_step`` counts optimizer steps (m per batch). The design, δ under DDP and resuming are in
    docs/design.md, "δ, the perturbation Free-m keeps". Without a CUDA graph it logs per epoch ``train/grad_alignment``
    (consecutive replays' δ gradients) and ``train/attack_gain`` (each batch's last replay's loss over its first's),
    which :class:`~freeadv_pl.CatastrophicOverfittingGuard` can watch.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        replays: m, the number of replays of each minibatch (≥ 1).
        epsilon: the L∞ bound ε of δ, in pixel units (a float or a string like ``"8/255"``).
        step_size: the δ step ε_step; None means ε, as in the paper.
        delta_memory: ``"batch"``: δ belongs to a position in the batch, as in the paper. ``"example"``: one δ per
            training image (a bank, :attr:`delta`), which comes back with its image the next epoch; the batches must be
            ``(x, y, index)`` (``VisionDataModule(return_index=True)``). See docs/design.md, "Two memories".
        delta_bank: where the bank lives: ``"device"`` (the training device) or ``"cpu"`` (host memory, pinned on a
            GPU run; each batch's rows travel to the device and back). Checked to fit before training.
        delta_start_noise: ρ; at each batch's start, δ ← clip(δ + ρ·ε·U(−1, 1), −ε, ε), a random restart mixed into
            the stored δ (0: off).
        delta_reset_every: set the stored δ (batch or bank) to zero at the start of every k-th epoch (None: never).
        epsilon_warmup_epochs: ε and ε_step ramp linearly from ~0 to their values over the first k epochs, batch by
            batch (0: off).
        cuda_graph: on one CUDA device, capture one replay in a CUDA graph at the first batch and replay it m times
            per batch. Needs an optimizer that can step inside a graph (the default optimizer on a GPU, or Adam/AdamW
            with ``capturable=True``); where it cannot be captured the replays run eagerly, with one warning. See
            docs/design.md, "The replay in a CUDA graph".
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        ValueError: if ``replays`` < 1, ε is outside [0, 1], ``step_size`` is not in (0, 1], on an unknown
            ``delta_memory`` or ``delta_bank``, a ``delta_start_noise`` outside [0, 1], a ``delta_reset_every`` < 1, a
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
        self.epsilon = as_pixel_fraction(epsilon, "epsilon")
        self.step_size = (
            self.epsilon if step_size is None else as_pixel_fraction(step_size, "step_size", allow_zero=False)
        )
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
        """Forward/backward passes per minibatch: one per replay."""
        return self.replays

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
                self._graph = ReplayGraph(self)
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
            noise = torch.empty_like(delta).uniform_(-1.0, 1.0, generator=self.random_generator(delta))
            delta.copy_((delta + self.delta_start_noise * epsilon * noise).clamp_(-epsilon, epsilon))
        if self._graph is not None and self._graph.fits(x):
            loss, logits = self._graph.run(x, y, delta, epsilon, step_size)
        else:
            built = None  # the previous replay's δ gradient, which built this replay's δ
            for replay in range(self.replays):
                leaf = delta.clone().requires_grad_(True)
                loss, logits = self.fit_step(torch.clamp(x + leaf, 0.0, 1.0), y)
                with torch.no_grad():
                    if replay == 0:
                        first_loss = loss.detach()
                    elif replay == self.replays - 1:
                        self._attack_gain.add(first_loss, loss)
                    if built is not None:
                        self._alignment.add(built, leaf.grad)
                    built = leaf.grad
                    step_delta(leaf, step_size, epsilon, self._nonfinite.update_guard(), delta)
            if self._graph is not None:  # a batch of another shape (the last, smaller one) ran eagerly
                self._graph.restore_gradients()
        if self.delta_memory == "example":
            self._bank.store(index, delta, stored, crop_flip)
        self.log_training(loss, logits, y)

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
