"""L∞ attacks in pixel space, as pure functions usable on any ``nn.Module``.

Inputs are images in [0, 1]; any mean/std normalization lives inside the model (docs/design.md, "Pixel space"), so ε and
step sizes are in pixel units and every adversarial example returned lies in the ε-ball around ``x`` and in
[0, 1]. The attacks work wherever they are called from, Lightning's ``no_grad`` validation and
``inference_mode`` testing included: they run under ``torch.inference_mode(False)`` and ``torch.enable_grad()``,
take gradients with ``torch.autograd.grad`` (parameter ``.grad`` fields are never touched) and put every
submodule of the model back in the train/eval mode it had.

This module imports nothing from Lightning.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode

AttackLoss = Literal["ce", "cw"]
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
    """A random start δ ~ U(-ε, ε), shaped like ``x``, drawn from ``generator`` (the global RNG if None). A generator
    on another device than ``x`` (a CPU generator for GPU images) draws on its own device, so a seeded CPU generator
    gives the same starts wherever the images are."""
    if generator is None or generator.device == x.device:
        return torch.empty_like(x).uniform_(-epsilon, epsilon, generator=generator)
    start = torch.empty(x.shape, dtype=x.dtype, device=generator.device)
    return start.uniform_(-epsilon, epsilon, generator=generator).to(x.device)


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
) -> Tensor | tuple[Tensor, Tensor | None]:
    """L∞ projected gradient descent (Madry et al. 2018) on images in [0, 1].

    Each step moves the perturbation by ``step_size · sign(∇_δ loss)``, then projects it back onto the ε-ball
    and onto [0, 1]. With ``restarts > 1`` the result is the per-example worst case: an example counts as broken
    if any restart breaks it; for the examples that no restart breaks, the first restart's result is kept, so a
    multi-restart attack is never weaker than its first restart alone.

    Args:
        model: maps images in [0, 1] to logits.
        x: clean images in [0, 1]. Tensors created under ``inference_mode`` are fine.
        y: true labels.
        epsilon: radius of the L∞ ball, in pixel units (a float or a string like ``"8/255"``).
        step_size: size of each signed-gradient step, in pixel units.
        steps: number of steps (0 gives the start point itself).
        restarts: number of independent random starts.
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (the margin of :func:`cw_loss`).
        random_start: start from δ ~ U(-ε, ε); otherwise from δ = 0.
        init: the starting perturbation of the first restart, overriding ``random_start`` for it.
        model_mode: the mode the model runs in during the attack: ``"eval"`` for evaluation, ``"train"`` for
            Madry et al.'s training-time attack (batch-norm uses batch statistics). Restored afterwards.
        generator: the random generator of the random starts (the global one if None).
        return_gradient: also return the input gradient of the last step's loss (summed over the batch, so each
            example's row is its own gradient), None with ``steps=0``; needs ``restarts=1``.

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
    epsilon = as_pixel_fraction(epsilon, "epsilon")
    step_size = as_pixel_fraction(step_size, "step_size", allow_zero=False)
    steps = check_int(steps, "steps", minimum=0)
    restarts = check_int(restarts, "restarts", minimum=1)
    check_choice(loss, "loss", ("ce", "cw"))
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
                delta = uniform_perturbation(x, epsilon, generator)
            else:
                delta = torch.zeros_like(x)
            x_adv, grad = _project(x + delta, x, epsilon), None
            for _ in range(steps):
                x_adv, grad = _signed_step(model, x_adv, x, y, epsilon, step_size, loss)
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


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, epsilon: float | str, loss: AttackLoss = "ce") -> Tensor:
    """The fast gradient sign method (Goodfellow et al. 2015): one step of size ε from δ = 0, clamped to [0, 1].

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x_adv = fgsm(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), epsilon=0.1)
        >>> tuple(x_adv.shape)
        (2, 1, 2, 2)
    """
    epsilon = as_pixel_fraction(epsilon, "epsilon")
    # With ε = 0 the projection undoes any step, so the step size only has to be valid.
    step_size = epsilon if epsilon > 0 else 1.0
    return pgd(model, x, y, epsilon=epsilon, step_size=step_size, steps=1, loss=loss, random_start=False)


def _signed_step(
    model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor, epsilon: float, step_size: float, loss: AttackLoss
) -> tuple[Tensor, Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    # Summed, not averaged, so that each example's gradient is its own whatever the batch size.
    objective = F.cross_entropy(logits, y, reduction="sum") if loss == "ce" else cw_loss(logits, y).sum()
    (grad,) = torch.autograd.grad(objective, x_adv)
    return _project(x_adv.detach() + step_size * grad.sign(), x, epsilon), grad


def _project(x_adv: Tensor, x: Tensor, epsilon: float) -> Tensor:
    """Project onto the ε-ball around x, then onto [0, 1] (which keeps it inside the ball)."""
    return torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)
