"""Lightning callbacks: robust evaluation, a guard against catastrophic overfitting, adversarial-example pictures,
training time, a checkpoint on preemption."""

from freeadv_pl.callbacks.adversarial_examples import AdversarialExamplesLogger
from freeadv_pl.callbacks.overfitting_guard import CatastrophicOverfittingGuard
from freeadv_pl.callbacks.preemption import PreemptionCheckpoint
from freeadv_pl.callbacks.robust_evaluation import RobustEvaluation
from freeadv_pl.callbacks.training_time import TrainingTime

__all__ = [
    "AdversarialExamplesLogger",
    "CatastrophicOverfittingGuard",
    "PreemptionCheckpoint",
    "RobustEvaluation",
    "TrainingTime",
]
