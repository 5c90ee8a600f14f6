"""FGSM-MEP, prior-guided FGSM with a momentum of example perturbations ("Prior-Guided Adversarial Initialization for
Fast Adversarial Training", Jia et al., ECCV 2022)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import ModelMode, uniform_perturbation
from freeadv_pl.data.augmentation import CropFlip
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules._checks import TRADES_ELSEWHERE, refuse_options
from freeadv_pl.modules._delta_bank import PerturbationBank, require_index, training_set_shape
from freeadv_pl.modules.base import ClassifierModule

MOMENTUM_KEY = "freeadv_pl_momentum_bank"
"""Checkpoint key of the per-example momentum bank (the perturbation bank keeps the default key)."""


class PriorGuidedFGSMModule(ClassifierModule):
    """FGSM-MEP training: each image's FGSM step starts from a prior kept for it since its last visit, built from a
    momentum of its past FGSM gradients; a regulariser ties the logits at the adversarial point to those at the prior.

    Per batch, with δ_p and m the image's rows of two banks (:attr:`delta`, :attr:`momentum`, one row per training
    image, in the frame of the un-augmented image): δ₀ = δ_p projected onto valid pixels; p = f(x + δ₀);
    g = ∇_δ₀ CE(p, y); m ← g / ‖g‖₁ + μ m; δ = Π(δ₀ + α sign(g)) trains the weights on
    ``CE(f(x + δ), y) + λ · MSE(f(x + δ), p)``; δ_p ← Π(δ₀ + α sign(m)) is stored for the next visit (Π: the ε-ball,
    then [0, 1]). The norm ‖g‖₁ is over the whole batch and p is not detached, as in the authors' code: the weight
    gradient flows through both points. At epoch 0 and every ``delta_reset_every``-th epoch the rows start afresh: δ_p
    = clip(α sign(U(-ε, ε)), -ε, ε), m = 0. The optimizer step's backward also gives the input gradient at x + δ, whose
    cosine with g is logged per epoch as ``train/grad_alignment``. Both banks are saved in checkpoints; p's graph is
    kept until the optimizer step, so activations of two forward passes are in memory at once.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        epsilon: the L∞ bound ε, in pixel units (a float or a string like ``"8/255"``).
        step_size: the FGSM step α in pixel units; None means ε, the authors'.
        momentum_decay: μ, the decay of the stored momentum (the authors' 0.3).
        regularizer_weight: λ, the weight of the mean squared error between the adversarial and the prior logits (the
            authors' 10); 0 trains on CE alone and drops the prior point's graph after the FGSM step.
        label_smoothing: the CE's label smoothing, as in ``F.cross_entropy``, in the FGSM step and the training loss.
            0: plain CE. The authors' smoothing (true class 0.6, the rest shared) is (1 - 0.6)·K/(K - 1), 4/9 for K = 10.
        delta_reset_every: the banks start afresh at every k-th epoch (the authors' 40 of 110 epochs); None: at epoch 0
            only.
        delta_bank: where the banks live: ``"device"`` or ``"cpu"`` (host memory), as Free-m's bank.
        attack_mode: the model's mode during the FGSM step at the prior: ``"train"`` (the authors' code) or ``"eval"``.
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        TypeError: if ``momentum_decay``, ``regularizer_weight`` or ``label_smoothing`` is not a number.
        ValueError: if ε is outside [0, 1], ``step_size`` is not in (0, 1], ``momentum_decay`` or
            ``regularizer_weight`` is negative or not finite, ``label_smoothing`` is outside [0, 1],
            ``delta_reset_every`` < 1, on an unknown ``delta_bank`` or ``attack_mode``, when given ``loss`` or ``norm``
            (it is L∞ only); at the start of ``fit`` when the banks do not fit in memory, and at the first batch when
            it is ``(x, y)``.

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = PriorGuidedFGSMModule(SmallCNN(), num_classes=10, epsilon="8/255")
        >>> round(module.step_size * 255, 6), module.momentum_decay, module.regularizer_weight, module.passes_per_batch
        (8.0, 0.3, 10.0, 3)
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int | None = None,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        momentum_decay: float = 0.3,
        regularizer_weight: float = 10.0,
        label_smoothing: float = 0.0,
        delta_reset_every: int | None = 40,
        delta_bank: Literal["device", "cpu"] = "device",
        attack_mode: ModelMode = "train",
        **kwargs: Any,
    ) -> None:
        own_loss = "FGSM-MEP trains on its own loss (CE plus a regulariser on the prior's logits). " + TRADES_ELSEWHERE
        l2_elsewhere = (
            "FGSM-MEP is implemented in the L∞ threat model only; for L2 use FreeAdversarialModule, "
            "PGDAdversarialModule, FastAdversarialModule or NoiseFGSMModule with norm='l2'."
        )
        refuse_options(
            "PriorGuidedFGSMModule", kwargs, {"loss": own_loss, "trades_beta": own_loss, "norm": l2_elsewhere}
        )
        super().__init__(backbone, num_classes, **kwargs)
        self.epsilon = as_pixel_fraction(epsilon, "epsilon")
        self.step_size = (
            self.epsilon if step_size is None else as_pixel_fraction(step_size, "step_size", allow_zero=False)
        )
        self.momentum_decay = _check_weight(momentum_decay, "momentum_decay", "the authors' 0.3")
        self.regularizer_weight = _check_weight(regularizer_weight, "regularizer_weight", "the authors' 10")
        self.label_smoothing = _check_weight(label_smoothing, "label_smoothing", "0 for plain CE", upper=1.0)
        self.delta_reset_every = (
            None if delta_reset_every is None else check_int(delta_reset_every, "delta_reset_every", minimum=1)
        )
        self.attack_mode = check_choice(attack_mode, "attack_mode", ("train", "eval"))
        location = check_choice(delta_bank, "delta_bank", ("device", "cpu"))
        self._bank = PerturbationBank(location)
        self._momentum = PerturbationBank(location, key=MOMENTUM_KEY)

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: the FGSM step's, the optimizer step's, and the optimizer step's
        backward through the prior point (its logits are not detached): two forwards and three backwards, counted as 3
        (2 with ``regularizer_weight=0``)."""
        return 3 if self.regularizer_weight > 0 else 2

    @property
    def delta(self) -> Tensor | None:
        """The prior bank ``(len(training set), *image)``: each image's start for its next visit; None before fit."""
        return self._bank.tensor

    @property
    def momentum(self) -> Tensor | None:
        """The momentum bank, shaped as :attr:`delta`; None before fit."""
        return self._momentum.tensor

    def kept_perturbation(self) -> PerturbationBank:
        return self._bank

    def _training_state(self) -> list[Any]:
        return [*super()._training_state(), self._momentum]

    def on_train_start(self) -> None:
        super().on_train_start()
        shape = training_set_shape(self.trainer, "PriorGuidedFGSMModule")
        for bank in (self._bank, self._momentum):
            bank.allocate(*shape, self.trainer)

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        x, y, index, crop_flip = unpack_batch(batch)
        index = require_index(index, "PriorGuidedFGSMModule")
        prior, prior_stored = self._bank.rows(index, x, crop_flip)
        # The momentum stays in float32 (or wider) whatever the images' dtype: its entries are ~1/(batch · pixels).
        momentum, momentum_stored = self._momentum.rows(index, x if x.dtype.itemsize >= 4 else x.float(), crop_flip)
        if self._starts_afresh():
            prior_stored, momentum_stored = self._fresh_prior(prior_stored), torch.zeros_like(momentum_stored)
            prior, momentum = _in_frame(prior_stored, crop_flip).to(x.dtype), torch.zeros_like(momentum)
        # The prior onto valid pixels: only a fresh prior can leave [0, 1] (stored priors were projected for this
        # image), and the authors, in normalised space, evaluate that point unprojected.
        start = torch.clamp(prior, -x, 1.0 - x).requires_grad_(True)
        with temporary_mode(self.model, self.attack_mode == "train"):
            prior_logits = self.model(x + start)
        # Summed CE: the scale cancels in sign(g) and g / ‖g‖₁. The graph stays for the regulariser's backward.
        attack_loss = F.cross_entropy(prior_logits, y, label_smoothing=self.label_smoothing, reduction="sum")
        keep_graph = self.regularizer_weight > 0
        (grad,) = torch.autograd.grad(attack_loss, start, retain_graph=keep_graph)
        with torch.no_grad():
            start = start.detach()
            moved = grad.to(momentum.dtype)
            # Normalised by the whole batch's L1 norm (the authors'), guarded against an all-zero gradient.
            momentum_next = (
                moved / moved.abs().sum().clamp_min(torch.finfo(moved.dtype).tiny) + self.momentum_decay * momentum
            )
            x_adv = x + self._project(start + self.step_size * grad.sign(), x)
            prior_next = self._project(start + self.step_size * momentum_next.sign(), x)

        def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
            loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
            if not keep_graph:
                return loss
            return loss + self.regularizer_weight * F.mse_loss(logits, prior_logits)

        # The weight backward also gives the input gradient at x_adv, for the alignment with the FGSM step's.
        x_adv.requires_grad_(True)
        loss, logits = self.fit_step(x_adv, y, loss_fn)
        with torch.no_grad():
            self._alignment.add(grad, x_adv.grad)
            ok = self._nonfinite.update_guard()
            if ok is not None:  # a skipped step keeps the image's prior and momentum (no host synchronisation)
                ok = ok & torch.isfinite(grad).all()
                prior_next = torch.where(ok, prior_next, prior)
                momentum_next = torch.where(ok, momentum_next, momentum)
            self._bank.store(index, prior_next, prior_stored, crop_flip)
            self._momentum.store(index, momentum_next, momentum_stored, crop_flip)
        self.log_training(loss, logits, y)

    def finish_epoch(self) -> None:
        super().finish_epoch()
        for bank in (self._bank, self._momentum):
            bank.synchronise(self.trainer)

    def _starts_afresh(self) -> bool:
        """Whether this epoch's priors are the random initialisation (every image is met once per epoch)."""
        every = self.delta_reset_every
        return self.current_epoch == 0 if every is None else self.current_epoch % every == 0

    def _fresh_prior(self, like: Tensor) -> Tensor:
        """The authors' initial prior, clip(α sign(U(-ε, ε)), -ε, ε), drawn in the bank's frame from this step's
        generator (exact resume; under DDP each process draws its own images' rows)."""
        draw = uniform_perturbation(like, self.epsilon, self.random_generator(like))
        return (self.step_size * draw.sign()).clamp_(-self.epsilon, self.epsilon)

    def _project(self, delta: Tensor, x: Tensor) -> Tensor:
        """δ onto the ε-ball, then onto the valid pixels of ``x``."""
        return torch.clamp(delta.clamp(-self.epsilon, self.epsilon), -x, 1.0 - x)


def _in_frame(stored: Tensor, crop_flip: CropFlip | None) -> Tensor:
    return stored if crop_flip is None else crop_flip.apply(stored)


def _check_weight(value: float, name: str, default: str, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number ≥ 0, got {value!r} ({type(value).__name__})")
    if not (0 <= value <= upper and math.isfinite(value)):
        within = "a finite number ≥ 0" if upper == math.inf else f"a number in [0, {upper:g}]"
        raise ValueError(f"{name} must be {within}, got {value!r}: use {default}")
    return float(value)
