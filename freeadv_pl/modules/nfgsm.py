"""N-FGSM adversarial training ("Make Some Noise: Reliable and Efficient Single-Step Adversarial Training", de Jorge
et al., NeurIPS 2022)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from freeadv_pl._checks import check_choice
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import ModelMode
from freeadv_pl.data.batch import unpack_batch
from freeadv_pl.modules._checks import TRADES_ELSEWHERE, refuse_options
from freeadv_pl.modules.base import ClassifierModule
from freeadv_pl.threat_models import Norm, ThreatModel, threat_model


class NoiseFGSMModule(ClassifierModule):
    """N-FGSM training: per minibatch, one FGSM step from a noisy point, not projected back onto the ε-ball, then one
    optimizer step (two forward/backward passes per batch, as FGSM-RS).

    Per batch: η ~ U(-kε, kε) with k = ``noise_scale``; ``δ = η + step_size · sign(∇_η CE(f(clamp(x + η, 0, 1)), y))``;
    with ``clip``, δ is clamped to [-clip, clip]; one optimizer step on ``CE(f(clamp(x + δ, 0, 1)), y)``. Without
    ``clip`` (the paper's default) ‖δ‖∞ reaches k ε + α, 3 ε by default: the paper finds that the noise and the missing
    projection keep single-step training free of catastrophic overfitting at large ε, without an early stop. In L2
    (``norm="l2"``) the noise is the L2 random start of radius kε, the step ``α · ∇ / ‖∇‖₂`` and ``clip`` an L2 radius. The
    optimizer step's backward also gives the input gradient at the adversarial batch, whose cosine with the FGSM
    step's gradient is logged per epoch as ``train/grad_alignment``.

    Args:
        backbone: any ``nn.Module`` mapping normalized images to logits.
        num_classes: number of classes; None: the DataModule's.
        epsilon: the L∞ radius ε the noise and the default step are scaled by, in pixel units (a float or a string
            like ``"8/255"``).
        step_size: the FGSM step α in pixel units; None means ε, the paper's.
        noise_scale: k, the noise's half-width in units of ε (the paper's 2); 0 gives plain unprojected FGSM.
        clip: None: no projection (the paper's); a number c > 0 (≤ 1 in L∞): δ is projected onto the c-ball (clamped to
            [-c, c] in L∞, the authors' ``--clip``).
        norm: the threat model, ``"linf"`` or ``"l2"``.
        attack_mode: the model's mode during the FGSM step: ``"train"`` (the authors' code) or ``"eval"``.
        **kwargs: the other arguments of :class:`ClassifierModule` (``mean``, ``std``, ``optimizer``, ...).

    Raises:
        TypeError: if ``noise_scale`` is not a number.
        ValueError: if ε or ``step_size`` is out of the norm's range (L∞: [0, 1]; L2: finite, ≥ 0), ``noise_scale`` is
            negative or not finite, ``clip`` is not > 0 (or > 1 in L∞), on an unknown ``attack_mode`` or ``norm``, or
            when given ``loss`` (N-FGSM trains on cross-entropy).

    Example:
        >>> from freeadv_pl.models import SmallCNN
        >>> module = NoiseFGSMModule(SmallCNN(), num_classes=10, epsilon="8/255")
        >>> round(module.step_size * 255, 6), module.noise_scale, module.clip, module.passes_per_batch
        (8.0, 2.0, None, 2)
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int | None = None,
        epsilon: float | str = 8 / 255,
        step_size: float | str | None = None,
        noise_scale: float = 2.0,
        clip: float | str | None = None,
        norm: Norm = "linf",
        attack_mode: ModelMode = "train",
        **kwargs: Any,
    ) -> None:
        advice = "N-FGSM trains on cross-entropy. " + TRADES_ELSEWHERE
        refuse_options("NoiseFGSMModule", kwargs, {"loss": advice, "trades_beta": advice})
        super().__init__(backbone, num_classes, **kwargs)
        self.threat = threat_model(norm)
        self.norm = self.threat.norm
        self.epsilon = self.threat.radius(epsilon, "epsilon")
        # No projection undoes the step, so at ε = 0 the default step is 0 too: natural training, not a 1.0 step.
        self.step_size = self.epsilon if step_size is None else self.threat.radius(step_size, "step_size")
        self.noise_scale = _check_noise_scale(noise_scale)
        self.clip = _check_clip(clip, self.threat)
        self.attack_mode = check_choice(attack_mode, "attack_mode", ("train", "eval"))

    @property
    def passes_per_batch(self) -> int:
        """Forward/backward passes per minibatch: one for the FGSM step, one for the optimizer step."""
        return 2

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = unpack_batch(batch)[:2]
        x_adv, built = self._perturb(x, y)
        # The weight backward also gives the input gradient at x_adv, for the alignment with the FGSM step's.
        x_adv.requires_grad_(True)
        loss, logits = self.fit_step(x_adv, y)
        with torch.no_grad():
            self._alignment.add(built, x_adv.grad)
        self.log_training(loss, logits, y)

    def _perturb(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's Algorithm 1 for one batch: noise, one FGSM step from the noisy point, no projection onto the
        ε-ball. Returns the adversarial images (detached) and the FGSM step's input gradient."""
        # η ~ U(-kε, kε), from the per-step generator only, so that a resumed run draws the same noise (exact resume).
        # kε may exceed 1: the random start draws any radius, and the clamps below keep the images in [0, 1].
        eta = self.threat.random_start(x, self.noise_scale * self.epsilon, self.random_generator(x))
        eta.requires_grad_(True)
        with temporary_mode(self.model, self.attack_mode == "train"):
            logits = self.model((x + eta).clamp(0.0, 1.0))
        # Summed, not averaged (as attacks.pgd), so that each example's gradient is its own whatever the batch size;
        # autograd.grad leaves the weights' .grad to fit_step.
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), eta)
        # The step starts from the noisy point and is not projected back onto the ε-ball, which the paper finds avoids
        # catastrophic overfitting; clip is the authors' optional projection.
        delta = self.threat.ascend(eta.detach(), grad, self.step_size)
        if self.clip is not None:
            delta = self.threat.project(delta, self.clip)
        return (x + delta).clamp(0.0, 1.0), grad


def _check_noise_scale(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"noise_scale must be a finite number ≥ 0 (the paper's is 2), got {value!r}")
    if not 0 <= value < math.inf:
        raise ValueError(
            f"noise_scale must be a finite number ≥ 0, got {value!r}: the noise is U(-kε, kε) with k = noise_scale; "
            "use the paper's noise_scale=2, or 0 for no noise."
        )
    return float(value)


def _check_clip(value: float | str | None, threat: ThreatModel) -> float | None:
    if value is None:
        return None
    try:
        return threat.radius(value, "clip", allow_zero=False)
    except ValueError as error:
        raise ValueError(f"{error}; pass clip=None for no projection (the paper's default)") from None
