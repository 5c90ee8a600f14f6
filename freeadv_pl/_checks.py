"""Argument checks shared by the attacks, modules and data modules.

Every check raises ``ValueError``/``TypeError`` with a message that names the argument, what was expected, what
was received and, where one exists, the fix (docs/design.md, "Errors").
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction


def as_number(value: float | str, name: str, expected: str) -> float:
    """Return ``value`` as a float, accepting numbers and fraction strings like ``"8/255"``; ``expected`` describes the
    valid values in the message (the range is the caller's to check).

    Example:
        >>> as_number("8/255", "epsilon", "a number ≥ 0") == 8 / 255
        True
    """
    wanted = f"{name} must be {expected}, as a number or a fraction string like '8/255', got {value!r}"
    if isinstance(value, bool):
        raise TypeError(wanted)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(wanted) from None
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(wanted)


def as_pixel_fraction(value: float | str, name: str, *, allow_zero: bool = True) -> float:
    """Return ``value`` as a float in [0, 1] pixel units, accepting numbers and strings like ``"8/255"``.

    Example:
        >>> as_pixel_fraction("8/255", "epsilon") == 8 / 255
        True
        >>> as_pixel_fraction(0.1, "epsilon")
        0.1
    """
    number = as_number(value, name, "a number in [0, 1]")
    low_ok = number >= 0 if allow_zero else number > 0
    if not (low_ok and number <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"{name} must lie in {bound} (pixel units: images are in [0, 1], so 8/255 ≈ 0.0314), got {value!r}"
        )
    return number


def check_int(value: int, name: str, *, minimum: int) -> int:
    """Return ``value`` if it is an integer ≥ ``minimum``; raise naming ``name`` otherwise.

    Example:
        >>> check_int(8, "replays", minimum=1)
        8
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer ≥ {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0; raise naming ``name`` otherwise.

    Example:
        >>> check_positive(1, "gradient_clip_norm")
        1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r} ({type(value).__name__})")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; raise naming ``name`` otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
