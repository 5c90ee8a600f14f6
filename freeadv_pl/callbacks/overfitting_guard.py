"""Stop a training whose robustness collapses ("catastrophic overfitting") and give back its best weights."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from freeadv_pl._checks import check_choice, check_int
from freeadv_pl._suite import EXAMPLES, bind, count
from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.attacks import ModelMode
from freeadv_pl.callbacks import _shared
from freeadv_pl.evaluation import SuiteAttack
from freeadv_pl.threat_models import threat_model

_IN_CHECKPOINT = "the checkpoint's own weights"  # saved instead of a copy when the best weights are the module's
PGD5 = AttackSpec(steps=5)  # the reference code's check: PGD-5, step ε/4 (in the training's norm)


class CatastrophicOverfittingGuard(Callback):
    """Watches the accuracy under ``attack`` of a fixed training batch every epoch; when it falls by more than
    ``threshold`` below its best, stops the training and restores the weights of the best epoch. The attack runs in
    the training module's threat model (its ``norm``, L∞ or L2; L∞ for a module without one) unless ``norm`` or the
    attack's own ``norm`` says otherwise.

    Catastrophic overfitting (Wong et al., ICLR 2020): single-step adversarial training can suddenly resist its own
    attack while PGD accuracy falls to near zero. Like the reference code's ``--early-stop``, after every training
    epoch the guard attacks the first ``num_samples`` images of the first training batch it saw (the same seeded
    starts each time) in ``model_mode`` and logs ``guard/robust_acc`` and ``guard/best_robust_acc``; each new best
    is copied to the CPU. On a drop of more than ``threshold`` it names the epoch, attack and figures, loads the best
    weights back (``restore_best``; not the optimizer state or Free-m's δ) and sets ``trainer.should_stop``. Under
    DDP the counts are summed over the processes. Its state survives a resume; a checkpoint holds at most one extra
    copy of the weights, only when the best epoch is older than the checkpoint.

    With ``alignment_threshold``, the guard runs no attack: it watches the training module's gradient alignment
    instead (``train/grad_alignment``, the epoch's mean cosine between the input gradient that built each training
    perturbation and the input gradient at the perturbed point; see docs/design.md, "Gradient alignment"). An epoch
    whose alignment falls below the threshold fires it, and the weights of the last epoch at or above it come back.
    Free-m's collapse does not lower its alignment. With ``gain_threshold``, the guard watches Free-m's attack gain
    instead (``train/attack_gain``, the epoch's mean of each batch's last-replay loss over its first-replay loss: its
    δ steps stop raising the loss when it collapses; docs/design.md, "The attack gain"), and fires on an epoch whose
    gain falls below the threshold.

    Args:
        attack: the attack: an :class:`~freeadv_pl.AttackSpec` with ``steps`` ≥ 1, an
            :class:`~freeadv_pl.AutoAttackSpec` or an attack of your own (:class:`~freeadv_pl.EvaluationAttack`); by
            default the reference code's PGD-5 with step ε/4.
        threshold: the drop of accuracy (a fraction, 0.2 = 20 points) below the best that triggers the guard.
        epsilon: the radius in pixel units (at most 1 in L∞, any finite number ≥ 0 in L2); None takes the
            module's ``epsilon``. One set in ``attack`` wins.
        num_samples: how many images of the first training batch to attack; None means all of them.
        restore_best: load the best weights back into the module when the guard fires.
        model_mode: the model's mode during the check, ``"eval"`` or ``"train"`` (the reference code's, which
            updates batch-norm running statistics with the attacked batch; for an attack that takes ``model_mode``,
            as ``AttackSpec`` does).
        seed: seed of the random starts.
        alignment_threshold: None: watch the attack's accuracy. A cosine in [−1, 1]: watch the gradient alignment
            (no attack runs, and ``attack``, ``threshold``, ``epsilon``, ``num_samples``, ``model_mode`` and
            ``seed`` are not used), and fire on an epoch whose alignment falls below it.
        gain_threshold: None, or a ratio > 0 (e.g. 1.05): watch the attack gain as ``alignment_threshold`` watches
            the alignment. At most one of the two is given.
        norm: the attack's threat model, ``"linf"`` or ``"l2"``; None: the training module's ``norm``.

    Raises:
        ValueError: on a ``threshold`` outside (0, 1], an attack with 0 steps, ``num_samples`` < 1, an unknown
            ``model_mode`` or ``norm``, ``model_mode="train"`` with an attack that takes no ``model_mode``, an ε
            outside the norm's range, an ``alignment_threshold`` outside [−1, 1], a ``gain_threshold`` ≤ 0 or not
            finite, both thresholds, or (at fit start) no ``epsilon`` given to a
            module that has none; with either threshold, at an epoch's end when the module recorded no such signal.
        TypeError: when ``attack`` lacks a member of :class:`~freeadv_pl.EvaluationAttack`.

    Example:
        In Python, ``Trainer(callbacks=[CatastrophicOverfittingGuard(AttackSpec(steps=10), threshold=0.2)])``; in
        a config::

            trainer:
              callbacks:
                - class_path: freeadv_pl.CatastrophicOverfittingGuard
                  init_args:
                    attack: {steps: 5, step_size: 2/255}
                    threshold: 0.2

        The attack-free alarms: ``CatastrophicOverfittingGuard(alignment_threshold=0.2)``, and for Free-m
        ``CatastrophicOverfittingGuard(gain_threshold=1.05)``.
    """

    def __init__(
        self,
        attack: SuiteAttack = PGD5,
        threshold: float = 0.2,
        epsilon: float | str | None = None,
        num_samples: int | None = None,
        restore_best: bool = True,
        model_mode: ModelMode = "eval",
        seed: int = 0,
        alignment_threshold: float | None = None,
        gain_threshold: float | None = None,
        norm: str | None = None,
    ) -> None:
        if gain_threshold is not None and (
            isinstance(gain_threshold, bool)
            or not isinstance(gain_threshold, (int, float))
            or not 0 < gain_threshold < math.inf
        ):
            raise ValueError(
                "gain_threshold must be a ratio > 0 (e.g. 1.05: the last replay's loss 5 % above the first's) or None, "
                f"got {gain_threshold!r}"
            )
        if gain_threshold is not None and alignment_threshold is not None:
            raise ValueError(
                "give alignment_threshold or gain_threshold, not both: one guard watches one signal (a Trainer can "
                "hold a second CatastrophicOverfittingGuard for the other)"
            )
        self.gain_threshold = None if gain_threshold is None else float(gain_threshold)
        if alignment_threshold is not None and (
            isinstance(alignment_threshold, bool)
            or not isinstance(alignment_threshold, (int, float))
            or not -1 <= alignment_threshold <= 1
        ):
            raise ValueError(
                "alignment_threshold must be a cosine in [-1, 1] (e.g. 0.2) or None (watch an attack's accuracy "
                f"instead), got {alignment_threshold!r}"
            )
        self.alignment_threshold = None if alignment_threshold is None else float(alignment_threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a fraction in (0, 1] (0.2 = 20 points of accuracy), got {threshold!r}")
        self.attack = _shared.perturbing(attack, "no attack to watch", "AttackSpec(steps=5)")
        self.threshold = float(threshold)
        self.norm, self.epsilon = _shared.init_norm_and_epsilon(norm, epsilon)
        if self.norm is not None:
            _shared.resolved_attack(self.attack, threat_model(self.norm), self)  # its ε and step size checked now
        self.num_samples = None if num_samples is None else check_int(num_samples, "num_samples", minimum=1)
        self.restore_best = restore_best
        self.model_mode = check_choice(model_mode, "model_mode", ("eval", "train"))
        if self.model_mode == "train" and not _shared.takes_model_mode(self.attack):
            raise ValueError(
                f"model_mode='train' needs an attack that runs with the model in training mode, and "
                f"{type(self.attack).__name__} takes no model_mode: use an AttackSpec (e.g. AttackSpec(steps=5)), give "
                "your attack's __call__ a model_mode argument, or keep model_mode='eval'."
            )
        self.seed = seed
        self.best_accuracy: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None  # trainer.global_step of the best weights
        self.fired_epoch: int | None = None
        self.history: list[float] = []
        self._best_state: dict[str, Tensor] | None = None
        self._batch: tuple[Tensor, Tensor] | None = None
        self._trainer: Trainer | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and self._signal is None:
            self._attack_and_epsilon(pl_module)  # fail before training, not after the first epoch

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._best_state == _IN_CHECKPOINT:  # resumed: the module's weights, just loaded, are the best
            self._best_state = _copy(pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch is None and self._signal is None:
            x, y = batch[0], batch[1]
            count = x.shape[0] if self.num_samples is None else min(self.num_samples, x.shape[0])
            self._batch = (x[:count].detach().clone(), y[:count].detach().clone())

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.fired_epoch is not None:
            return
        if self._signal is not None:
            self._run_alarm(trainer, pl_module)
        elif self._batch is not None:
            self._run_check(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        unmoved = self._trainer is not None and self._trainer.global_step == self.best_step
        state = {key: getattr(self, key) for key in ("best_accuracy", "best_epoch", "best_step", "fired_epoch")}
        return state | {"history": list(self.history), "best_state": _IN_CHECKPOINT if unmoved else self._best_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("best_accuracy", "best_epoch", "best_step", "fired_epoch"):
            setattr(self, key, state_dict.get(key))
        self.history = list(state_dict["history"])
        self._best_state = state_dict["best_state"]

    def _attack_and_epsilon(self, pl_module: LightningModule) -> tuple[SuiteAttack, float]:
        """The attack in the evaluation's threat model, and its ε."""
        threat = _shared.threat(self, pl_module)
        attack = _shared.resolved_attack(self.attack, threat, self)
        return attack, _shared.epsilon(self, pl_module, [attack], threat)

    def _run_check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        attack, epsilon = self._attack_and_epsilon(pl_module)
        options = {"model_mode": self.model_mode} if _shared.takes_model_mode(attack) else {}
        attacks = bind([attack], pl_module, epsilon, **options)
        counts = count(pl_module, [self._batch], attacks, seed=self.seed, training=self.model_mode == "train")
        correct, total = _shared.summed(trainer, pl_module.device, [counts[attack.key], counts[EXAMPLES]])
        accuracy, epoch = float(correct / total), trainer.current_epoch
        self.history.append(accuracy)
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch, self.best_step = accuracy, epoch, trainer.global_step
            self._best_state = _copy(pl_module)
        pl_module.log("guard/robust_acc", accuracy)
        pl_module.log("guard/best_robust_acc", self.best_accuracy)
        if self.best_accuracy - accuracy <= self.threshold:
            return
        self._fire(
            trainer,
            pl_module,
            f"{attack.title} accuracy ({attack.describe(epsilon)}) on the fixed training batch fell to "
            f"{accuracy:.2%} from its best {self.best_accuracy:.2%} (epoch {self.best_epoch}), a drop of more than "
            f"{self.threshold:.0%}",
        )

    @property
    def state_key(self) -> str:
        """The key of this guard's state in checkpoints: one per watched signal, so that a Trainer can hold one
        guard on an attack and one on each attack-free signal."""
        signal = self._signal
        return super().state_key if signal is None else self._generate_state_key(watch=signal[2])

    @property
    def _signal(self) -> tuple[str, str, str, float] | None:
        """The attack-free signal watched: (the module's method, its name, the guard's argument, the threshold)."""
        if self.alignment_threshold is not None:
            return "grad_alignment", "gradient alignment", "alignment_threshold", self.alignment_threshold
        if self.gain_threshold is not None:
            return "attack_gain", "attack gain", "gain_threshold", self.gain_threshold
        return None

    def _run_alarm(self, trainer: Trainer, pl_module: LightningModule) -> None:
        method, name, argument, threshold = self._signal
        value = getattr(pl_module, method)() if hasattr(pl_module, method) else None
        if value is None:
            recorders = (
                "FreeAdversarialModule without cuda_graph, FastAdversarialModule, PGDAdversarialModule, "
                "NoiseFGSMModule, PriorGuidedFGSMModule"
                if method == "grad_alignment"
                else "FreeAdversarialModule with replays >= 2, without cuda_graph"
            )
            raise ValueError(
                f"CatastrophicOverfittingGuard({argument}=...) needs the training module's {name}, but "
                f"{type(pl_module).__name__} recorded none in epoch {trainer.current_epoch}. Modules that record it: "
                f"{recorders}; otherwise watch an attack instead ({argument}=None)."
            )
        self.history.append(value)
        if value >= threshold:  # a healthy epoch: the weights to come back to
            self.best_epoch, self.best_step = trainer.current_epoch, trainer.global_step
            self._best_state = _copy(pl_module)
            return
        last = "no earlier epoch" if self.best_epoch is None else f"epoch {self.best_epoch}"
        self._fire(
            trainer,
            pl_module,
            f"the {name} fell to {value:.3f}, below {argument} {threshold:g} (the last epoch at or above it: {last})",
        )

    def _fire(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        self.fired_epoch = trainer.current_epoch
        restore = self.restore_best and self._best_state is not None
        action = f"restoring the weights of epoch {self.best_epoch}" if restore else "keeping the weights"
        rank_zero_info(
            f"CatastrophicOverfittingGuard: catastrophic overfitting at epoch {self.fired_epoch}: {what}. Stopping "
            f"the training and {action}."
        )
        if restore:
            pl_module.load_state_dict(self._best_state)
            self.best_step = trainer.global_step  # the module's weights are the best again
        trainer.should_stop = True


def _copy(pl_module: LightningModule) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()}
