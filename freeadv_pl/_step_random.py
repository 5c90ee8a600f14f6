"""Random numbers drawn during training as a function of (seed, process, optimizer step), so that a resumed run draws
what the uninterrupted run drew (docs/design.md, "Exact resume")."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "freeadv_pl_random"


def step_seed(seed: int, rank: int, step: int) -> int:
    """A seed for the draws of process ``rank`` at optimizer step ``step`` of a run seeded with ``seed``."""
    return hash((seed, rank, step)) % 2**63


class StepRandom:
    """The generator a training module draws its random numbers from (random starts, δ noise).

    At each training batch :meth:`generator` reseeds it from the run's seed, the process's rank and
    ``trainer.global_step``: the draws of a batch depend on nothing else, so no generator state needs restoring. The
    run's seed is ``torch.initial_seed()`` at the first ``fit`` (what ``seed_everything`` set) and is kept in
    checkpoints; a checkpoint written before it was kept resumes with a warning.
    """

    def __init__(self) -> None:
        self.seed: int | None = None
        self._restored = False  # the seed came from a checkpoint, for the next fit
        self._generators: dict[torch.device, torch.Generator] = {}

    def start(self) -> None:
        """At the start of fit: fix the run's seed, unless a checkpoint gave it."""
        if not self._restored or self.seed is None:
            self.seed = torch.initial_seed() % 2**63
        self._restored = False

    def generator(self, device: torch.device, trainer: Trainer | None) -> torch.Generator | None:
        """The generator for this batch's draws on ``device``; None (the global RNG) outside ``fit``."""
        if trainer is None or self.seed is None or not trainer.training:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(step_seed(self.seed, trainer.global_rank, trainer.global_step))

    def save(self, checkpoint: dict[str, Any], trainer: Trainer) -> None:
        if self.seed is not None:
            checkpoint[CHECKPOINT_KEY] = {"seed": self.seed}

    def load(self, checkpoint: dict[str, Any], trainer: Trainer | None) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        self.seed = None if saved is None else int(saved["seed"])
        self._restored = saved is not None
        if saved is None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                "this checkpoint was written by an older freeadv_pl, which did not keep the training data's order or "
                "the seed of the random starts: the run resumes with its weights, optimizer state and δ, but draws "
                "another data order and other random numbers than the uninterrupted run would have."
            )
