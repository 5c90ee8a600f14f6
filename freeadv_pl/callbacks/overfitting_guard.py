"""Stop a training whose robustness collapses ("catastrophic overfitting") and give back its best weights."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from freeadv_pl._checks import as_pixel_fraction, check_choice, check_int
from freeadv_pl._modes import temporary_mode
from freeadv_pl.attacks import ModelMode, pgd


class CatastrophicOverfittingGuard(Callback):
    """Watches PGD accuracy on a fixed training batch every epoch; when it falls by more than ``threshold`` below its
    best, stops the training and restores the weights of the best epoch.

    Catastrophic overfitting (Wong et al., ICLR 2020): single-step adversarial training (FGSM, FGSM-RS with large
    steps, Free-m with too large ε_step) can suddenly learn to resist its own one-step attack while PGD accuracy
    falls to near zero within an epoch. The reference code's ``--early-stop`` detects it with a 5-step PGD on the
    first training batch after each epoch; this callback does the same for any module of the package (any
    ``LightningModule`` whose ``forward`` takes images in [0, 1]).

    At the end of every training epoch: PGD (``steps`` steps of ``step_size``, ``restarts`` random starts drawn from
    a generator seeded with ``seed``, so each check faces the same starts) on the first ``num_samples`` images of the
    first training batch this callback saw, with the model in ``model_mode`` (restored afterwards). It logs
    ``guard/robust_acc`` and ``guard/best_robust_acc``. While the accuracy improves, a copy of the module's weights
    (``state_dict``, on the CPU) is kept. On a drop of more than ``threshold`` below the best: a message names the
    epoch and the figures, the best weights are loaded back into the module (``restore_best``), and
    ``trainer.should_stop`` is set (Lightning honours ``min_epochs`` first). The optimizer state and Free-m's δ are
    not rewound. Checkpoints written after the check (``ModelCheckpoint`` at the end of the epoch) hold the
    restored weights.

    Under DDP each process checks its own first batch and the correct counts are summed over the processes, so
    every process takes the same decision. The kept weights and figures are in ``state_dict`` and survive a resume;
    after a resume the fixed batch is the first batch seen after it.

    Args:
        threshold: the drop of PGD accuracy (a fraction, 0.2 = 20 points) below the best that triggers the guard.
        epsilon: the L∞ radius of the attack in pixel units; None takes the module's ``epsilon``.
        steps: PGD steps (5 in the reference code).
        step_size: PGD step in pixel units; None means ε/4 (2/255 at ε = 8/255, as the reference code).
        restarts: PGD random starts.
        num_samples: how many images of the first training batch to attack; None means all of them.
        restore_best: load the best weights back into the module when the guard fires.
        model_mode: the model's mode during the check, ``"eval"`` or ``"train"`` (the reference code's, which
            updates batch-norm running statistics with the attacked batch).
        seed: seed of the random starts.

    Raises:
        ValueError: on a ``threshold`` outside (0, 1], ``steps`` or ``restarts`` < 1, ``num_samples`` < 1, an unknown
            ``model_mode``, or (at fit start) no ``epsilon`` given to a module that has none.

    Example:
        In Python, ``Trainer(callbacks=[CatastrophicOverfittingGuard(threshold=0.2)])``; in a config::

            trainer:
              callbacks:
                - class_path: freeadv_pl.CatastrophicOverfittingGuard
                  init_args:
                    threshold: 0.2
    """

    def __init__(
        self,
        threshold: float = 0.2,
        epsilon: float | str | None = None,
        steps: int = 5,
        step_size: float | str | None = None,
        restarts: int = 1,
        num_samples: int | None = None,
        restore_best: bool = True,
        model_mode: ModelMode = "eval",
        seed: int = 0,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a fraction in (0, 1] (0.2 = 20 points of accuracy), got {threshold!r}")
        self.threshold = float(threshold)
        self.epsilon = None if epsilon is None else as_pixel_fraction(epsilon, "epsilon")
        self.steps = check_int(steps, "steps", minimum=1)
        self.step_size = None if step_size is None else as_pixel_fraction(step_size, "step_size", allow_zero=False)
        self.restarts = check_int(restarts, "restarts", minimum=1)
        self.num_samples = None if num_samples is None else check_int(num_samples, "num_samples", minimum=1)
        self.restore_best = restore_best
        self.model_mode = check_choice(model_mode, "model_mode", ("eval", "train"))
        self.seed = seed
        self.best_accuracy: float | None = None
        self.best_epoch: int | None = None
        self.fired_epoch: int | None = None
        self.history: list[float] = []
        self._best_state: dict[str, Tensor] | None = None
        self._batch: tuple[Tensor, Tensor] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._attack_epsilon(pl_module)  # fail before training, not after the first epoch

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch is None:
            x, y = batch[0], batch[1]
            count = x.shape[0] if self.num_samples is None else min(self.num_samples, x.shape[0])
            self._batch = (x[:count].detach().clone(), y[:count].detach().clone())

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._batch is not None and self.fired_epoch is None:
            self._run_check(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_accuracy": self.best_accuracy,
            "best_epoch": self.best_epoch,
            "fired_epoch": self.fired_epoch,
            "history": list(self.history),
            "best_state": self._best_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_accuracy = state_dict["best_accuracy"]
        self.best_epoch = state_dict["best_epoch"]
        self.fired_epoch = state_dict["fired_epoch"]
        self.history = list(state_dict["history"])
        self._best_state = state_dict["best_state"]

    def _attack_epsilon(self, pl_module: LightningModule) -> float:
        if self.epsilon is not None:
            return self.epsilon
        epsilon = getattr(pl_module, "epsilon", None)
        if epsilon is None:
            raise ValueError(
                f"{type(pl_module).__name__} has no `epsilon`: give CatastrophicOverfittingGuard(epsilon=...) "
                "the radius of the attack to watch, e.g. 8/255"
            )
        return epsilon

    def _robust_accuracy(self, trainer: Trainer, pl_module: LightningModule) -> float:
        epsilon = self._attack_epsilon(pl_module)
        x, y = (tensor.to(pl_module.device) for tensor in self._batch)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x_adv = pgd(
            pl_module,
            x,
            y,
            epsilon=epsilon,
            step_size=epsilon / 4 if self.step_size is None else self.step_size,
            steps=self.steps,
            restarts=self.restarts,
            model_mode=self.model_mode,
            generator=generator,
        )
        with torch.no_grad(), temporary_mode(pl_module, self.model_mode == "train"):
            correct = (pl_module(x_adv).argmax(dim=1) == y).sum()
        counts = torch.stack([correct, torch.tensor(y.shape[0], device=y.device)]).float()
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return float(counts[0] / counts[1])

    def _run_check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        accuracy = self._robust_accuracy(trainer, pl_module)
        epoch = trainer.current_epoch
        self.history.append(accuracy)
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = accuracy, epoch
            self._best_state = {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()}
        pl_module.log("guard/robust_acc", accuracy)
        pl_module.log("guard/best_robust_acc", self.best_accuracy)
        if self.best_accuracy - accuracy <= self.threshold:
            return
        self.fired_epoch = epoch
        action = f"restoring the weights of epoch {self.best_epoch}" if self.restore_best else "keeping the weights"
        rank_zero_info(
            f"CatastrophicOverfittingGuard: catastrophic overfitting at epoch {epoch}: PGD-{self.steps} accuracy on "
            f"the fixed training batch fell to {accuracy:.2%} from its best {self.best_accuracy:.2%} "
            f"(epoch {self.best_epoch}), a drop of more than {self.threshold:.0%}. Stopping the training and {action}."
        )
        if self.restore_best:
            pl_module.load_state_dict(self._best_state)
        trainer.should_stop = True
