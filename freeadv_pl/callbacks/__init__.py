"""Lightning callbacks: robust evaluation, a guard against catastrophic overfitting, adversarial-example pictures."""

from freeadv_pl.callbacks.adversarial_examples import AdversarialExamplesLogger
from freeadv_pl.callbacks.overfitting_guard import CatastrophicOverfittingGuard
from freeadv_pl.callbacks.robust_evaluation import RobustEvaluation

__all__ = ["AdversarialExamplesLogger", "CatastrophicOverfittingGuard", "RobustEvaluation"]
