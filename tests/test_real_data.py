"""On real Fashion-MNIST: natural training is not robust, Free-m and FGSM-RS training are (the paper's claim, in
small), and the overfitting guard stays quiet on a healthy FGSM-RS run."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, Subset

from conftest import needs_fashion_mnist, quiet_trainer
from freeadv_pl import (
    CatastrophicOverfittingGuard,
    FashionMNISTDataModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    SmallCNN,
    pgd,
)
from freeadv_pl.evaluation import count_correct

EPSILON = 0.1
ATTACK = functools.partial(pgd, epsilon=EPSILON, step_size=EPSILON / 4, steps=10)  # PGD-10, step ε/4, 1 restart


def _train_and_evaluate(module_class, seed: int, epochs: int, callbacks=(), **kwargs) -> tuple[float, float]:
    """Clean and PGD-10 accuracy (%) on 500 test images after training on 10,000 training images."""
    seed_everything(seed)
    data = FashionMNISTDataModule(batch_size=128, train_size=10000, val_size=1000, seed=seed)
    module = module_class(
        SmallCNN(), num_classes=10, mean=data.mean, std=data.std,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4), **kwargs,
    )
    quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=list(callbacks)).fit(module, datamodule=data)
    data.setup("test")
    loader = DataLoader(Subset(data.test_set, range(500)), batch_size=500)
    clean, total = count_correct(module.model, loader)
    robust, _ = count_correct(module.model, loader, ATTACK)
    return 100.0 * clean / total, 100.0 * robust / total


@functools.cache
def _natural(seed: int) -> tuple[float, float]:
    """Natural training for 8 epochs: 8 forward/backward passes per training image, the budget of every row here."""
    return _train_and_evaluate(NaturalModule, seed, epochs=8)


@needs_fashion_mnist
@pytest.mark.parametrize("seed", [0, 1])
def test_free_training_keeps_robust_accuracy_where_natural_training_loses_it(seed):
    # Equal budgets: 8 forward/backward passes per training image for both (natural 8 epochs; Free-4, 2 epochs).
    natural_clean, natural_robust = _natural(seed)
    free_clean, free_robust = _train_and_evaluate(
        FreeAdversarialModule, seed, epochs=2, replays=4, epsilon=EPSILON, step_size=EPSILON / 2
    )
    print(f"seed {seed}: natural {natural_clean:.1f}% clean / {natural_robust:.1f}% PGD-10; "
          f"Free-4 {free_clean:.1f}% / {free_robust:.1f}%")
    assert natural_clean > 80 and free_clean > 60
    assert natural_robust < 10, "a naturally trained model must fall under PGD"
    assert free_robust > natural_robust + 15, "Free-m must keep a substantial part of its accuracy under PGD"


@needs_fashion_mnist
def test_fgsm_rs_training_keeps_robust_accuracy_and_the_guard_stays_quiet():
    # Equal budget again: FGSM-RS costs 2 forward/backward passes per image, so 4 epochs.
    guard = CatastrophicOverfittingGuard(epsilon=EPSILON)
    natural_clean, natural_robust = _natural(0)
    fast_clean, fast_robust = _train_and_evaluate(
        FastAdversarialModule, 0, epochs=4, callbacks=[guard], epsilon=EPSILON, step_size=1.25 * EPSILON
    )
    print(f"natural {natural_clean:.1f}% clean / {natural_robust:.1f}% PGD-10; FGSM-RS {fast_clean:.1f}% / "
          f"{fast_robust:.1f}%; guard history {guard.history}")
    assert fast_clean > 60
    assert fast_robust > natural_robust + 15, "FGSM-RS must keep a substantial part of its accuracy under PGD"
    assert len(guard.history) == 4 and guard.fired_epoch is None, "the guard must not fire on a healthy run"
