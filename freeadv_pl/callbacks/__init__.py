"""Lightning callbacks: robust evaluation during and after training, a guard against catastrophic overfitting."""

from freeadv_pl.callbacks.overfitting_guard import CatastrophicOverfittingGuard
from freeadv_pl.callbacks.robust_evaluation import RobustEvaluation

__all__ = ["CatastrophicOverfittingGuard", "RobustEvaluation"]
