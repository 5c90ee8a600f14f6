"""What K-PGD and FGSM-RS training share: attack the batch with the weights frozen, then one optimizer step on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import ModelMode, pgd
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.losses import TrainingLoss, training_loss
from freeadv_pl.modules.base import ClassifierModule
from freeadv_pl.threat_models import threat_model


class AttackedBatchModule(ClassifierModule):
    """Per minibatch: ``steps`` PGD steps of ``step_size`` in the threat model's norm from
    :meth:`initial_perturbation` (each projected onto the ε-ball and [0, 1], taken with ``torch.autograd.grad`` so
    that weight gradients stay untouched), with the model in ``attack_mode``, on the training loss's attack objective
    (CE, or TRADES's KL against the clean probabilities, computed once per batch in ``attack_mode``); then one
    optimizer step on the training loss at the adversarial batch. ``steps + 1`` forward/backward passes per batch
    (``steps + 2`` under TRADES, whose optimizer step runs the clean batch too, plus the attack target's forward pass).
    The optimizer step's backward also gives the input gradient at the adversarial batch, whose cosine with the last
    attack step's gradient is logged per epoch as ``train/grad_alignment``. Subclasses define the start and call
    :meth:`set_attack`; see :class:`PGDAdversarialModule`."""

    def set_attack(
        self,
        steps: int,
        epsilon: float | str,
        step_size: float | str,
        attack_mode: ModelMode | None,
        norm: str = "linf",
        loss: str | TrainingLoss = "ce",
        trades_beta: float = 6.0,
    ) -> None:
        """Check and set the attack's settings (subclasses call it in ``__init__``, after ``super().__init__``).
        ``attack_mode=None`` is ``"eval"`` under a loss that reads the clean logits (the TRADES authors' attack: the
        batch-norm statistics stay out of it and the KL target is the deterministic model's) and ``"train"`` otherwise
        (Madry et al.'s and Wong et al.'s reference code)."""
        self.threat = threat_model(norm)
        self.norm = self.threat.norm
        self.training_loss = training_loss(loss, trades_beta)
        self.steps = check_int(steps, "steps", minimum=1)
        self.epsilon = self.threat.radius(epsilon, "epsilon")
        self.step_size = self.threat.radius(step_size, "step_size", allow_zero=False)
        if attack_mode is None:
            attack_mode = "eval" if self.training_loss.needs_clean else "train"
        self.attack_mode = check_choice(attack_mode, "attack_mode", ("train", "eval"))

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: ``steps`` for the attack, one for the optimizer step (two under a loss
        that reads the clean logits; the attack target's forward-only pass is not counted)."""
        return self.steps + (2 if self.training_loss.needs_clean else 1)

    def initial_perturbation(self, x: Tensor) -> Tensor:
        """The attack's start δ₀ for the batch ``x`` (before projection); override it to inject another start."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        clean = None
        if self.training_loss.needs_clean:
            with torch.no_grad(), temporary_mode(self.model, self.attack_mode == "train"):
                clean = self.model(x)
        x_adv, built = pgd(
            self.model,
            x,
            y,
            epsilon=self.epsilon,
            step_size=self.step_size,
            steps=self.steps,
            init=self.initial_perturbation(x),
            model_mode=self.attack_mode,
            return_gradient=True,
            norm=self.threat,
            loss=self.training_loss.attack_loss(clean),
        )
        # The weight backward also gives the input gradient at x_adv, for the alignment with the last attack step's.
        x_adv.requires_grad_(True)
        loss, logits = self.fit_step(x_adv, y, clean=x)
        with torch.no_grad():
            self._alignment.add(built, x_adv.grad)
        x_adv = x_adv.detach()
        self.after_step(x, x_adv)
        self.log_training(loss, logits, y)

    def after_step(self, x: Tensor, x_adv: Tensor) -> None:
        """Called after each batch's optimizer step with the clean and the adversarial batch."""
