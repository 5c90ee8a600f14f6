"""Threat models: the set of perturbations an attacker may add to an image, as objects (L∞ and L2).

A threat model owns everything that depends on the norm: the check on a radius or step size, the random start, the
step from a gradient, the projection onto the ball (and onto valid images) and the wording in reports. Attacks,
trainers, evaluation and the CUDA graph receive one and never test the norm themselves; a new threat model is a new
subclass here, registered in :data:`THREAT_MODELS`. The choices (the L2 start inside the ball, the step) are explained
in docs/design.md, "Threat models".

This module imports nothing from Lightning.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from freeadv_pl._checks import as_number, as_pixel_fraction, check_choice

__all__ = ["L2", "THREAT_MODELS", "LInf", "Norm", "ThreatModel", "check_radius", "format_pixels", "threat_model"]

_TINY = 1e-12  # the smallest gradient or perturbation norm divided by


class ThreatModel:
    """The perturbations δ with ‖δ‖ ≤ ε in one norm, on images in [0, 1] (pixel units).

    Subclasses set :attr:`norm` (the string the API and configs take), :attr:`symbol` (the norm's name in reports),
    :attr:`torchattacks_norm` (the name torchattacks uses) and implement the four tensor methods. Every method works
    per example, over all dimensions but the first (the batch), and accepts ``epsilon``/``step_size`` as numbers or
    as 0-dim tensors (inside a CUDA graph).
    """

    norm: str
    symbol: str
    torchattacks_norm: str
    max_radius: float
    """The largest radius or step size :meth:`radius` accepts."""

    def radius(self, value: float | str, name: str = "epsilon", *, allow_zero: bool = True) -> float:
        """``value`` (a number or a string like ``"8/255"``) as a radius or step size of this norm; a ``ValueError``
        naming ``name`` and the valid range otherwise."""
        raise NotImplementedError

    def random_start(self, like: Tensor, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
        """A random δ inside the ε-ball, shaped like ``like``, drawn from ``generator`` (the global RNG if None). A
        generator on another device than ``like`` draws on its own device, so a seeded CPU generator gives the same
        start wherever the images are."""
        raise NotImplementedError

    def ascend(self, delta: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        """One steepest-ascent step of size ``step_size`` along ``grad`` in this norm (a new tensor, not projected)."""
        raise NotImplementedError

    def project(self, delta: Tensor, epsilon: float | Tensor) -> Tensor:
        """``delta`` projected onto the ε-ball (a new tensor)."""
        raise NotImplementedError

    def project_images(self, x_adv: Tensor, x: Tensor, epsilon: float) -> Tensor:
        """``x_adv`` projected onto the ε-ball around ``x``, then onto [0, 1] (a new tensor)."""
        return (x + self.project(x_adv - x, epsilon)).clamp_(0.0, 1.0)

    def describe(self, epsilon: float) -> str:
        """The radius as reports write it, e.g. ``L∞ ε = 8/255`` or ``L2 ε = 0.5``."""
        return f"{self.symbol} ε = {format_pixels(epsilon)}"

    def label(self, epsilon: float) -> str:
        """The radius as an attack's description writes it: :meth:`describe`, without the norm's name in L∞ (the
        default, unnamed as in :meth:`key` and :meth:`title`): ``ε = 8/255``, ``L2 ε = 0.5``."""
        return self.describe(epsilon)

    def key(self, base: str) -> str:
        """A metric key for this norm: ``base`` itself in L∞ (the default), ``base_l2`` otherwise."""
        return base if self.norm == "linf" else f"{base}_{self.norm}"

    def title(self, base: str) -> str:
        """A column title for this norm: ``base`` itself in L∞, ``base (L2)`` otherwise."""
        return base if self.norm == "linf" else f"{base} ({self.symbol})"

    def __repr__(self) -> str:
        return f"threat_model({self.norm!r})"


class LInf(ThreatModel):
    """‖δ‖∞ ≤ ε: every pixel moves by at most ε. The step is ``α · sign(g)``; the projection clips each pixel; the
    random start is uniform in the cube, δ ~ U(−ε, ε). ε ≤ 1 (a larger radius allows every image)."""

    norm = "linf"
    symbol = "L∞"
    torchattacks_norm = "Linf"
    max_radius = 1.0  # a larger radius allows every image

    def radius(self, value: float | str, name: str = "epsilon", *, allow_zero: bool = True) -> float:
        return as_pixel_fraction(value, name, allow_zero=allow_zero)

    def random_start(self, like: Tensor, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
        if generator is None or generator.device == like.device:
            return torch.empty_like(like).uniform_(-epsilon, epsilon, generator=generator)
        start = torch.empty(like.shape, dtype=like.dtype, device=generator.device)
        return start.uniform_(-epsilon, epsilon, generator=generator).to(like.device)

    def ascend(self, delta: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        if isinstance(step_size, Tensor):
            return torch.addcmul(delta, grad.sign(), step_size)
        return torch.add(delta, grad.sign(), alpha=step_size)

    def project(self, delta: Tensor, epsilon: float | Tensor) -> Tensor:
        return delta.clamp(-epsilon, epsilon)

    def label(self, epsilon: float) -> str:
        return f"ε = {format_pixels(epsilon)}"

    def project_images(self, x_adv: Tensor, x: Tensor, epsilon: float) -> Tensor:
        # On the images (min/max against x ± ε), which is how the attacks have always rounded.
        return torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp_(0.0, 1.0)


class L2(ThreatModel):
    """‖δ‖₂ ≤ ε, the Euclidean norm over each whole image. The step is ``α · g / max(‖g‖₂, 1e-12)``; the projection
    scales δ by ``min(1, ε / ‖δ‖₂)``; the random start is a uniformly random direction at a radius drawn uniformly
    from [0, ε] (inside the ball, not on its surface: docs/design.md, "Threat models"). Any finite ε ≥ 0."""

    norm = "l2"
    symbol = "L2"
    torchattacks_norm = "L2"
    max_radius = math.inf

    def radius(self, value: float | str, name: str = "epsilon", *, allow_zero: bool = True) -> float:
        bound = "≥ 0" if allow_zero else "> 0"
        number = as_number(value, name, f"a finite number {bound}")
        if not (math.isfinite(number) and (number >= 0 if allow_zero else number > 0)):
            raise ValueError(
                f"{name} must be a finite number {bound} (an L2 radius in pixel units over the whole image: 0.5 is "
                f"CIFAR-10's usual, 3.0 ImageNet's), got {value!r}"
            )
        return number

    def random_start(self, like: Tensor, epsilon: float, generator: torch.Generator | None = None) -> Tensor:
        device = like.device if generator is None else generator.device
        direction = torch.empty(like.shape, dtype=like.dtype, device=device).normal_(generator=generator)
        norms = _norms(direction).clamp_min(_TINY)
        radius = torch.empty_like(norms).uniform_(0.0, 1.0, generator=generator)
        return (direction * (radius / norms * epsilon)).to(like.device)

    def describe(self, epsilon: float) -> str:
        return f"{self.symbol} ε = {epsilon:g}"  # a radius over the whole image: 255/255 would mislead

    def ascend(self, delta: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        return delta + step_size * (grad / _norms(grad).clamp_min(_TINY))

    def project(self, delta: Tensor, epsilon: float | Tensor) -> Tensor:
        return delta * (epsilon / _norms(delta).clamp_min(_TINY)).clamp(max=1.0)


def _norms(tensor: Tensor) -> Tensor:
    """Each example's Euclidean norm, shaped to broadcast over its rows: ``(B, 1, ..., 1)``."""
    return tensor.flatten(1).norm(dim=1).view(-1, *[1] * (tensor.dim() - 1))


THREAT_MODELS: dict[str, ThreatModel] = {"linf": LInf(), "l2": L2()}
"""The threat models by the name the API and configs take (``norm="linf"``)."""
Norm = Literal["linf", "l2"]
"""A threat model's name, as the modules' and commands' ``norm`` arguments take it: one per key of
:data:`THREAT_MODELS` (the command line lists them in ``--help`` and refuses others)."""


def threat_model(norm: str | ThreatModel = "linf") -> ThreatModel:
    """The threat model named ``norm`` (``"linf"`` or ``"l2"``), or ``norm`` itself if it already is one.

    Example:
        >>> threat_model("l2").describe(0.5)
        'L2 ε = 0.5'
        >>> threat_model("linf").describe(8 / 255)
        'L∞ ε = 8/255'
    """
    if isinstance(norm, ThreatModel):
        return norm
    if not isinstance(norm, str):
        raise TypeError(f"norm must be one of {', '.join(map(repr, THREAT_MODELS))}, got {norm!r}")
    return THREAT_MODELS[check_choice(norm, "norm", tuple(THREAT_MODELS))]


def check_radius(
    value: float | str, name: str = "epsilon", norm: str | ThreatModel | None = None, *, allow_zero: bool = True
) -> float:
    """``value`` as a radius or step size of ``norm``'s threat model (:meth:`ThreatModel.radius`); with ``norm=None``
    (not known yet: an evaluation's norm comes from the training module), a value that some threat model accepts, to
    be checked against the norm once it is known. The error then gives every threat model's range, the default's
    (L∞'s) first.

    Example:
        >>> check_radius("8/255") == 8 / 255, check_radius(3.0), check_radius(0.5, norm="l2")
        (True, 3.0, 0.5)
    """
    if norm is not None:
        return threat_model(norm).radius(value, name, allow_zero=allow_zero)
    errors = []
    for threat in THREAT_MODELS.values():
        try:
            return threat.radius(value, name, allow_zero=allow_zero)
        except ValueError as error:
            errors.append((threat, str(error)))
    (default, first), *others = errors
    raise ValueError(
        f"{first} ({default.symbol}, the default norm); "
        + "; ".join(f"with norm={threat.norm!r}: {message}" for threat, message in others)
    )


def format_pixels(value: float) -> str:
    """``8/255`` for whole multiples of 1/255 (up to rounding), the decimal otherwise.

    Example:
        >>> format_pixels(2 / 255), format_pixels(0.5)
        ('2/255', '0.5')
    """
    levels = round(value * 255)
    return f"{levels}/255" if abs(levels - value * 255) < 1e-6 else f"{value:g}"
