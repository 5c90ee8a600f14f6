"""Lightning callbacks: robust evaluation during and after training."""

from freeadv_pl.callbacks.robust_evaluation import RobustEvaluation

__all__ = ["RobustEvaluation"]
