"""Attacks in pixel space, in any threat model (L∞ or L2), as pure functions usable on any ``nn.Module``.

Inputs are images in [0, 1]; any mean/std normalization lives inside the model (docs/design.md, "Pixel space"), so ε and
step sizes are in pixel units and every adversarial example returned lies in the ε-ball around ``x`` and in [0, 1]. The
norm's start, step and projection come from :mod:`freeadv_pl.threat_models`. The attacks work wherever they are called
from, Lightning's ``no_grad`` validation and ``inference_mode`` testing included: they run under ``torch.inference_mode(False)`` and ``torch.enable_grad()``,
take gradients with ``torch.autograd.grad`` (parameter ``.grad`` fields are never touched) and put every
submodule of the model back in the train/eval mode it had.

This module imports nothing from Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.threat_models import ThreatModel, threat_model

AttackLoss = Literal["ce", "cw"] | Callable[[Tensor, Tensor], Tensor]
"""What an attack maximises: ``"ce"``, ``"cw"``, or a function of (logits, labels) giving the loss summed over the
batch (summed, not averaged, so that each example's gradient is its own whatever the batch size)."""
ModelMode = Literal["eval", "train"]

__all__ = ["cw_loss", "fgsm", "pgd", "uniform_perturbation"]


def cw_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The Carlini–Wagner margin per example: the largest wrong logit minus the true logit.

    Positive exactly when the example is misclassified. Works for any number of classes (the TensorFlow reference
    of the Free paper hard-codes 10). Madry et al.'s version clips the margin at κ = 50, which only changes
    anything once an example is already misclassified by 50 logits.

    Args:
        logits: ``(B, C)`` scores, ``C ≥ 2``.
        target: ``(B,)`` true class indices.

    Returns:
        ``(B,)`` margins.

    Example:
        >>> cw_loss(torch.tensor([[2.0, 5.0, 1.0]]), torch.tensor([0]))
        tensor([3.])
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (batch, classes ≥ 2), got {tuple(logits.shape)}")
    true_logit = logits.gather(1, target[:, None]).squeeze(1)
    is_true = F.one_hot(target, logits.shape[1]).bool()
    wrong_logit = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
    return wrong_logit - true_logit


def uniform_perturbation(x: Tensor, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
    """A random start δ ~ U(-ε, ε), shaped like ``x``, drawn from ``generator`` (the global RNG if None): the L∞ threat
    model's :meth:`~freeadv_pl.threat_models.ThreatModel.random_start`. A generator on another device than ``x`` (a
    CPU generator for GPU images) draws on its own device, so a seeded CPU generator gives the same starts wherever
    the images are."""
    return threat_model("linf").random_start(x, epsilon, generator)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float | str,
    step_size: float | str,
    steps: int,
    restarts: int = 1,
    loss: AttackLoss = "ce",
    random_start: bool = True,
    init: Tensor | None = None,
    model_mode: ModelMode = "eval",
    generator: torch.Generator | None = None,
    return_gradient: bool = False,
    norm: str | ThreatModel = "linf",
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Projected gradient descent (Madry et al. 2018) on images in [0, 1], in the L∞ or the L2 threat model.

    Each step moves the perturbation by ``step_size`` along the norm's steepest-ascent direction of the loss
    (``sign(∇)`` in L∞, ``∇ / ‖∇‖₂`` in L2), then projects it back onto the ε-ball and onto [0, 1]. With
    ``restarts > 1`` the result is the per-example worst case: an example counts as broken if any restart breaks it; for the examples that no restart breaks, the first restart's result is kept, so a
    multi-restart attack is never weaker than its first restart alone.

    Args:
        model: maps images in [0, 1] to logits.
        x: clean images in [0, 1]. Tensors created under ``inference_mode`` are fine.
        y: true labels.
        epsilon: radius of the ball, in pixel units (a float or a string like ``"8/255"``).
        step_size: size of each step, in pixel units.
        steps: number of steps (0 gives the start point itself).
        restarts: number of independent random starts.
        loss: ``"ce"`` (cross-entropy), ``"cw"`` (the margin of :func:`cw_loss`), or a function of (logits, labels)
            giving the loss summed over the batch (e.g. TRADES's KL term,
            :meth:`~freeadv_pl.losses.TrainingLoss.attack_loss`).
        random_start: start from the norm's random start (δ ~ U(-ε, ε) in L∞; in L2 a random direction at a radius
            uniform in [0, ε]); otherwise from δ = 0.
        init: the starting perturbation of the first restart, overriding ``random_start`` for it.
        model_mode: the mode the model runs in during the attack: ``"eval"`` for evaluation, ``"train"`` for
            Madry et al.'s training-time attack (batch-norm uses batch statistics). Restored afterwards.
        generator: the random generator of the random starts (the global one if None).
        return_gradient: also return the input gradient of the last step's loss (summed over the batch, so each
            example's row is its own gradient), None with ``steps=0``; needs ``restarts=1``.
        norm: the threat model, ``"linf"`` or ``"l2"`` (or a :class:`~freeadv_pl.threat_models.ThreatModel`).

    Returns:
        The adversarial images, detached, on ``x``'s device and dtype; with ``return_gradient``, the pair (images,
        gradient).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> x_adv = pgd(model, x, y, epsilon="8/255", step_size="2/255", steps=10)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6) and bool(x_adv.min() >= 0) and bool(x_adv.max() <= 1)
        True
    """
    threat = threat_model(norm)
    epsilon = threat.radius(epsilon, "epsilon")
    step_size = threat.radius(step_size, "step_size", allow_zero=False)
    steps = check_int(steps, "steps", minimum=0)
    restarts = check_int(restarts, "restarts", minimum=1)
    objective = _objective(loss)
    check_choice(model_mode, "model_mode", ("eval", "train"))
    if init is not None and init.shape != x.shape:
        raise ValueError(f"init must have the shape of x {tuple(x.shape)}, got {tuple(init.shape)}")
    if return_gradient and restarts > 1:
        raise ValueError(f"return_gradient=True needs restarts=1 (one last step), got restarts={restarts}")

    with temporary_mode(model, model_mode == "train"), torch.inference_mode(False), torch.enable_grad():
        # Clones made here are ordinary tensors even when x, y come from inference mode.
        x, y = x.detach().clone(), y.detach().clone()
        best = fooled = None
        for restart in range(restarts):
            if restart == 0 and init is not None:
                delta = init.detach().to(x)
            elif random_start:
                delta = threat.random_start(x, epsilon, generator)
            else:
                delta = torch.zeros_like(x)
            x_adv, grad = threat.project_images(x + delta, x, epsilon), None
            for _ in range(steps):
                x_adv, grad = _step(model, x_adv, x, y, threat, epsilon, step_size, objective)
            if restarts == 1:
                return (x_adv, grad) if return_gradient else x_adv
            with torch.no_grad():
                now_fooled = model(x_adv).argmax(dim=1) != y
            if best is None:
                best, fooled = x_adv, now_fooled
            else:
                newly = now_fooled & ~fooled
                best = torch.where(newly.view(-1, *([1] * (x.ndim - 1))), x_adv, best)
                fooled = fooled | now_fooled
            if bool(fooled.all()):
                break
        return best


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float | str,
    loss: AttackLoss = "ce",
    norm: str | ThreatModel = "linf",
) -> Tensor:
    """The fast gradient sign method (Goodfellow et al. 2015): one step of size ε from δ = 0, clamped to [0, 1]; in
    L2 (``norm="l2"``) the step is ``ε · ∇ / ‖∇‖₂`` (the fast gradient method).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x_adv = fgsm(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), epsilon=0.1)
        >>> tuple(x_adv.shape)
        (2, 1, 2, 2)
    """
    threat = threat_model(norm)
    epsilon = threat.radius(epsilon, "epsilon")
    # With ε = 0 the projection undoes any step, so the step size only has to be valid.
    step_size = epsilon if epsilon > 0 else 1.0
    return pgd(model, x, y, epsilon=epsilon, step_size=step_size, steps=1, loss=loss, random_start=False, norm=threat)


def _objective(loss: AttackLoss) -> Callable[[Tensor, Tensor], Tensor]:
    """The attack's loss as a function of (logits, labels), summed over the batch."""
    if callable(loss):
        return loss
    if check_choice(loss, "loss", ("ce", "cw")) == "ce":
        # Summed, not averaged, so that each example's gradient is its own whatever the batch size.
        return lambda logits, y: F.cross_entropy(logits, y, reduction="sum")
    return lambda logits, y: cw_loss(logits, y).sum()


def _step(
    model: nn.Module,
    x_adv: Tensor,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    epsilon: float,
    step_size: float,
    objective: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(model(x_adv), y), x_adv)
    return threat.project_images(threat.ascend(x_adv.detach(), grad, step_size), x, epsilon), grad
