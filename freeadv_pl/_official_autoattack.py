"""The official AutoAttack (Croce & Hein's code, PyPI's ``pyautoattack``) on one batch, with what it reports kept
per attack (pure PyTorch, no Lightning).

The official code reports through the ``auto-attack`` logger: its progress at DEBUG level (which attack runs, the
robust accuracy after each), its checks at WARNING level (a randomized or dynamic defense, outputs that look like
probabilities, too few classes, zero gradients, Square finding what the gradient attacks missed). A check called
without a logger uses ``warnings.warn`` instead. While it runs, both are taken from the user's logging and warnings
and returned: the checks as ``(attack, message)`` flags, the progress as the robust accuracy after each attack.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

CHECKS = "checks"  # the flags of the checks that run before the first attack
ATTACKS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "apgd": ("apgd-ce", "apgd-dlr")}
TITLES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square", "apgd-dlr": "APGD-DLR"}
STAGES = {version: tuple(TITLES[attack] for attack in attacks) for version, attacks in ATTACKS.items()}
_RUNNING = re.compile(r"running (\S+)")
_AFTER = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


def run_official(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    clean: int,
    norm: str,
    epsilon: float,
    seed: int,
    version: str,
    steps: int,
    queries: int,
    restarts: int,
    targets: int,
    verbose: bool,
) -> tuple[Tensor, dict[str, int], list[tuple[str, str]]]:
    """The official code's adversarial images of ``x`` (``x`` where it found none), the number of examples robust
    after each stage (``"clean"``: ``clean``, then each attack by its title in :data:`STAGES`, as its log says) and
    its flags.

    ``version`` ``"standard"`` is its standard version, ``"apgd"`` its APGD-CE and APGD-DLR (``version="custom"``);
    ``norm`` is ``"Linf"`` or ``"L2"``; ``seed`` seeds every attack (the official code reseeds torch's global
    generators with it: the caller forks them). The other arguments replace the official values only where they
    differ from them; ``verbose`` prints its progress.
    """
    from pyautoattack import AutoAttack

    with _captured(verbose) as log:
        common: dict[str, Any] = {"norm": norm, "eps": epsilon, "seed": seed, "device": x.device}
        if version == "standard":
            adversary = AutoAttack(model, version="standard", **common)
        else:
            adversary = AutoAttack(model, version="custom", attacks=list(ATTACKS["apgd"]), **common)
        _set(adversary, model, steps=steps, queries=queries, restarts=restarts, targets=targets, **common)
        adversary.verbose = True  # its progress carries the robust accuracy after each attack; `log` keeps it
        found, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    # Its class-count check names the targeted DLR loss for any DLR loss: at 3 classes it flags APGD-DLR, which
    # needs only 3 (APGD-T's needs 4, and the caller checks that before it runs).
    flags = [flag for flag in log.flags if not (version == "apgd" and "targeted DLR loss" in flag[1])]
    return found, _counts(log.stages, len(x), clean, version), flags


def _counts(fractions: dict[str, float], examples: int, clean: int, version: str) -> dict[str, int]:
    """The robust fractions that the official code logged after each attack as counts of ``examples``, ``"clean"``
    first; an attack skipped because nothing was left counts 0, one not logged is absent."""
    stages = {"clean": clean}
    for title in STAGES[version]:
        if title in fractions:
            stages[title] = round(fractions[title] * examples)  # logged with 2 decimals: exact below 10,000
        elif list(stages.values())[-1] == 0:
            stages[title] = 0
    return stages


def _set(
    adversary: Any, model: nn.Module, *, steps: int, queries: int, restarts: int, targets: int, **common: Any
) -> None:
    """Our parameters on the official attacks: a no-op at the official ones on 10 or more classes (9 targets)."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    if steps != adversary.apgd.n_iter:  # APGD derives its checkpoints from n_iter when built: build it again
        apgd = {**common, "n_iter": steps, "n_restarts": restarts, "eot_iter": 1, "rho": 0.75, "verbose": False}
        adversary.apgd = APGDAttack(model, logger=adversary.logger, **apgd)
        adversary.apgd_targeted = APGDAttack_targeted(model, logger=adversary.logger, **apgd)
        adversary.fab.n_iter = steps
    adversary.apgd.n_restarts = adversary.apgd_targeted.n_restarts = restarts  # "custom" builds APGD with 5
    adversary.fab.n_restarts = adversary.square.n_restarts = restarts  # FAB-T sets 1 itself when it runs
    adversary.square.n_queries = queries
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets


class _Log(logging.Handler):
    """The ``auto-attack`` logger's records while one run lasts: the attack running, the flags, the robust accuracy
    after each attack; with ``verbose``, its progress printed. :meth:`warning` takes the official code's warnings
    (those raised in ``package``) and passes the others to ``show``."""

    def __init__(self, verbose: bool, package: Path, show: Any) -> None:
        super().__init__(logging.DEBUG)
        self.verbose, self.package, self.show = verbose, package, show
        self.attack = CHECKS
        self.flags: list[tuple[str, str]] = []
        self.stages: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if running := _RUNNING.fullmatch(message):
            self.attack = TITLES.get(running[1], running[1])
        elif after := _AFTER.match(message):
            self.stages[TITLES.get(after[1].lower(), after[1])] = float(after[2]) / 100
        if record.levelno >= logging.WARNING:
            self.flags.append((self.attack, message))
        elif self.verbose:
            print(f"AutoAttack: {message}", flush=True)

    def warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
        """``warnings.showwarning`` while the run lasts."""
        if Path(filename).resolve().is_relative_to(self.package):
            self.flags.append((self.attack, str(message)))
        else:
            self.show(message, category, filename, lineno, *args)


@contextmanager
def _captured(verbose: bool) -> Iterator[_Log]:
    """The ``auto-attack`` logger's records and the official code's warnings go to a :class:`_Log` (and nowhere
    else) while the run lasts; its dynamic-defense check's side effects are undone."""
    import pyautoattack
    from pyautoattack import checks

    logger = logging.getLogger("auto-attack")
    saved = logger.level, logger.propagate, logger.disabled
    # Its dynamic-defense check counts calls of functions named grad/backward in module-wide counters it never
    # resets (one dynamic model would flag every later one), and switches off any trace function (a debugger's or
    # coverage's): reset the one, restore the other.
    checks.funcs.update(dict.fromkeys(checks.funcs, 0))
    trace = sys.gettrace()
    with warnings.catch_warnings():
        log = _Log(verbose, Path(pyautoattack.__file__).resolve().parent, warnings.showwarning)
        warnings.showwarning = log.warning
        logger.setLevel(logging.DEBUG)
        logger.propagate, logger.disabled = False, False
        logger.addHandler(log)
        try:
            yield log
        finally:
            sys.settrace(trace)
            logger.removeHandler(log)
            logger.setLevel(saved[0])
            logger.propagate, logger.disabled = saved[1], saved[2]
