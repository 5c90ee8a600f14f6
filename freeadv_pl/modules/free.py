"""Free adversarial training, Algorithm 2 ("Free-m") of Shafahi et al., NeurIPS 2019."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_int
from freeadv_pl.modules._perturbation import StoredPerturbation
from freeadv_pl.modules.base import ClassifierModule


class FreeAdversarialModule(ClassifierModule):
    """Free-m adversarial training: each minibatch is replayed m times, and every replay's single backward pass
    gives both the weight gradient (for one optimizer step) and the gradient of the perturbation δ.

    Per replay (Algorithm 2): ``x_adv = clamp(x + δ[:B], 0, 1)``; ``loss = CE(f(x_adv), y)``; one backward;
    the optimizer steps with the weight gradient; ``δ ← clip(δ + step_size · sign(∇_δ loss), -ε, ε)`` with the
    gradient taken at the same point as the weight gradient. δ is kept across minibatches and epochs; a smaller
    last batch uses and updates ``δ[:B]``. A replay whose δ-gradient (an fp16 overflow) or loss is not finite leaves
    δ unchanged.

    The budget rule: m replays cost m forward/backward passes per batch, so Free-m trained for N/m epochs costs
    what natural training does in N epochs. ``trainer.global_step`` counts optimizer steps (m per batch), and the
    LR scheduler is stepped per optimizer step, so schedules are written in optimizer steps.

    δ is a plain tensor attribute, not a registered buffer (under DDP each rank keeps its own), allocated lazily
    at the first batch and exposed as :attr:`delta`.

    Resuming (``Trainer.fit(..., ckpt_path=...)``): a checkpoint holds every process's δ (gathered when it is saved)
    and each process takes its own back; with another number of processes, process r takes δ_r where it exists and
    otherwise starts from zeros, with a warning. Weights, optimizer state, LR scheduler, ``global_step`` and δ come
    back exactly, so a run resumed from an end-of-epoch checkpoint ends as the uninterrupted run would, provided the
    data come in the same order (a one-process ``shuffle=True`` loader draws each epoch's order from the global RNG,
    which checkpoints do not hold; DDP's sampler seeds it by epoch). A mid-epoch checkpoint
    (``ModelCheckpoint(every_n_train_steps=...)``, counted in optimizer steps, m per batch) holds the state after its
    batch's m replays, but Lightning re-enters the epoch with a new iterator over a plain DataLoader: the rest of
    that epoch gets the loader's first batches again, not the ones left, and the epoch ends at its usual length.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes.
        replays: m, the number of replays of each minibatch (≥ 1).
        epsilon: the L∞ bound ε of δ, in pixel units (a float or a string like ``"8/255"``).
        step_size: the δ step ε_step; None means ε, as in the paper.
        **kwargs: ``mean``, ``std``, ``optimizer``, ``lr_scheduler`` of :class:`ClassifierModule`.

    Raises:
        ValueError: if ``replays`` < 1, ε is outside [0, 1] or ``step_size`` is not in (0, 1].

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = FreeAdversarialModule(SmallCNN(), num_classes=10, replays=4, epsilon="8/255")
        >>> module.delta is None
        True
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int,
        replays: int = 8,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.replays = check_int(replays, "replays", minimum=1)
        self.epsilon = as_pixel_fraction(epsilon, "epsilon")
        self.step_size = (
            self.epsilon if step_size is None else as_pixel_fraction(step_size, "step_size", allow_zero=False)
        )
        self._delta = StoredPerturbation()

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: one per replay."""
        return self.replays

    @property
    def delta(self) -> Tensor | None:
        """The stored perturbation δ (batch-sized), or None before the first training batch."""
        return self._delta.tensor

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        delta = self._delta.for_batch(x)  # a view of δ[:B]: writing into it updates the stored δ
        for _ in range(self.replays):
            leaf = delta.clone().requires_grad_(True)
            loss, logits = self.fit_step(torch.clamp(x + leaf, 0.0, 1.0), y)
            with torch.no_grad():
                grad = leaf.grad
                stepped = (leaf + self.step_size * grad.sign()).clamp_(-self.epsilon, self.epsilon)
                # torch.where instead of an `if`: skipping a non-finite replay costs no host synchronisation.
                delta.copy_(torch.where(torch.isfinite(grad).all() & torch.isfinite(loss), stepped, leaf))
        self.log_training(loss, logits, y)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self._delta.save(checkpoint, self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._delta.load(checkpoint, self._trainer)
