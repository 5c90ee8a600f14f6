"""On real Fashion-MNIST: natural training is not robust, Free-m and FGSM-RS training are (the paper's claim, in
small), the overfitting guard stays quiet on a healthy FGSM-RS run and catches Free-m's collapse at ε_step = ε."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
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
L2_EPSILON = 1.5  # configs/fashion_mnist/free_l2.yaml's radius
GAIN_THRESHOLD = 1.05  # CatastrophicOverfittingGuard(gain_threshold=...) for Free-4 on this data
ATTACK = functools.partial(pgd, epsilon=EPSILON, step_size=EPSILON / 4, steps=10)  # PGD-10, step ε/4, 1 restart
L2_ATTACK = functools.partial(pgd, epsilon=L2_EPSILON, step_size=L2_EPSILON / 4, steps=10, norm="l2")  # L2 PGD-10


class _EpochGain(Callback):
    """The module's attack gain at each training epoch's end (None for a module that records none)."""

    def __init__(self) -> None:
        self.values = []

    def on_train_epoch_end(self, trainer, module):
        self.values.append(module.attack_gain())


def _train_and_evaluate(module_class, seed: int, epochs: int, attack=ATTACK, **kwargs) -> tuple[float, float]:
    """Clean and ``attack`` (PGD-10 by default) accuracy (%) on 500 test images after :func:`_train`."""
    return _evaluate(_train(module_class, seed, epochs, **kwargs), attack)


def _train(
    module_class, seed: int, epochs: int, callbacks=(), lr: float = 0.05, one_cycle_steps: int | None = None, **kwargs
):
    """The module trained on 10,000 training images (79 batches), with SGD at ``lr``, or with the shipped Free
    config's one-cycle schedule peaking at ``lr`` over ``one_cycle_steps``."""
    seed_everything(seed)
    data = FashionMNISTDataModule(batch_size=128, train_size=10000, val_size=1000, seed=seed, return_index=True)

    def one_cycle(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, lr, total_steps=one_cycle_steps, pct_start=0.4, anneal_strategy="linear", cycle_momentum=False
        )

    module = module_class(
        SmallCNN(), num_classes=10, mean=data.mean, std=data.std,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=None if one_cycle_steps is None else one_cycle, **kwargs,
    )
    quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=list(callbacks)).fit(module, datamodule=data)
    return module


def _evaluate(module, attack) -> tuple[float, float]:
    """Clean and ``attack`` accuracy (%) of ``module`` on the first 500 test images."""
    data = FashionMNISTDataModule()
    data.setup("test")
    loader = DataLoader(Subset(data.test_set, range(500)), batch_size=500)
    clean, total = count_correct(module.model, loader)
    robust, _ = count_correct(module.model, loader, attack)
    return 100.0 * clean / total, 100.0 * robust / total


@functools.cache
def _natural_module(seed: int):
    """Natural training for 8 epochs: 8 forward/backward passes per training image, the budget of every row here."""
    return _train(NaturalModule, seed, epochs=8)


@functools.cache
def _natural(seed: int) -> tuple[float, float]:
    return _evaluate(_natural_module(seed), ATTACK)


GAINS: dict[int, list[float]] = {}  # seed -> Free-4's attack gain per epoch, recorded by _free


@functools.cache
def _free(seed: int) -> tuple[float, float]:
    """The shipped Free-4 recipe (configs/fashion_mnist/free.yaml: per-example δ with a random restart, ε_step = ε/2,
    a one-cycle lr) for 2 epochs, natural training's budget of 8 passes per training image. The peak is 0.02 here (the
    config's is 0.05): over these 632 steps seeds 0-2 spread over 2.4 points at 0.02 and 3.8 at 0.05."""
    gain = _EpochGain()
    result = _train_and_evaluate(
        FreeAdversarialModule, seed, epochs=2, lr=0.02, one_cycle_steps=2 * 79 * 4, replays=4, epsilon=EPSILON,
        step_size=EPSILON / 2, delta_memory="example", delta_start_noise=1.0, callbacks=[gain],
    )
    GAINS[seed] = gain.values
    return result


@needs_fashion_mnist
@pytest.mark.parametrize("seed", [0, 1])
def test_free_training_keeps_robust_accuracy_where_natural_training_loses_it(seed):
    # Measured over seeds 0-4 at 1 torch thread (seeds 0 and 1 also at 2): Free-4 57.2-59.6 % PGD-10 and 82.6-83.6 %
    # clean, natural training 2.6-4.4 % and 86.8-89.6 %. Each margin below is several times its figure's spread.
    natural_clean, natural_robust = _natural(seed)
    free_clean, free_robust = _free(seed)
    print(f"seed {seed}: natural {natural_clean:.1f}% clean / {natural_robust:.1f}% PGD-10; "
          f"Free-4 {free_clean:.1f}% / {free_robust:.1f}%")
    assert natural_clean > 75 and free_clean > 70
    assert natural_robust < 15, "a naturally trained model must fall under PGD"
    assert free_robust > 40, "Free-m must keep a substantial part of its accuracy under PGD"


@needs_fashion_mnist
def test_the_shipped_free_recipe_holds_at_every_seed():
    # Seeds 0-4 spread over 2.4 points here (57.2-59.6 %). The same recipe at natural training's lr 0.05 from the
    # first step, as the shipped config had it, gave 35.0, 46.0 and 50.4 % at seeds 0-2: this test fails on it.
    robust = [_free(seed)[1] for seed in (0, 1, 2)]
    print(f"Free-4 PGD-10 at seeds 0, 1, 2: {robust}; attack gain per epoch: {GAINS}")
    assert max(robust) - min(robust) < 10, f"a seed's robust accuracy fell far below the others': {robust}"
    assert min(min(gains) for gains in GAINS.values()) > GAIN_THRESHOLD, "the gain alarm stays quiet on these runs"


@needs_fashion_mnist
def test_free_m_in_l2_and_with_trades_keeps_robust_accuracy_where_natural_training_loses_it():
    # Natural training's budget for both: Free-4 in L2 for 2 epochs, Free-4 TRADES (two passes per replay) for 1.
    recipe = dict(replays=4, lr=0.02, delta_memory="example", delta_start_noise=1.0)
    natural_clean, natural_l2 = _evaluate(_natural_module(0), L2_ATTACK)
    _, natural_linf = _natural(0)
    l2_clean, l2_robust = _train_and_evaluate(
        FreeAdversarialModule, 0, epochs=2, attack=L2_ATTACK, one_cycle_steps=2 * 79 * 4, norm="l2",
        epsilon=L2_EPSILON, step_size=L2_EPSILON / 2, **recipe,
    )
    trades_clean, trades_robust = _train_and_evaluate(
        FreeAdversarialModule, 0, epochs=1, one_cycle_steps=79 * 4, loss="trades", epsilon=EPSILON,
        step_size=EPSILON / 2, **recipe,
    )
    print(f"natural {natural_clean:.1f}% clean, {natural_l2:.1f}% L2 PGD-10 (ε = {L2_EPSILON}), {natural_linf:.1f}% "
          f"L∞ PGD-10; Free-4 L2 {l2_clean:.1f}% / {l2_robust:.1f}%; Free-4 TRADES {trades_clean:.1f}% / "
          f"{trades_robust:.1f}% L∞ PGD-10")
    assert l2_clean > 60 and trades_clean > 60
    assert l2_robust > natural_l2 + 25, "Free-m in L2 must keep far more accuracy under L2 PGD than natural training"
    assert trades_robust > natural_linf + 30, "Free-m TRADES must keep far more accuracy under PGD than natural"


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


class _EpochWeights(Callback):
    """The module's weights at each training epoch's end, taken before the guard (listed after it) acts."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_epoch_end(self, trainer, module):
        self.weights.append({key: value.clone() for key, value in module.state_dict().items()})


@needs_fashion_mnist
def test_the_guard_catches_free_m_collapsing_at_the_papers_step_and_restores_the_best_weights():
    # Free-4 with per-example δ memory, no restart and the paper's ε_step = ε, at lr 0.05 from the first step,
    # collapses on this network over 5,000 images. Seeded (with the DataModule's per-epoch seeded order), the guard's
    # PGD-5 accuracy on its fixed batch went 32.8 → 31.3 → 25.0 → 0.0 % on 2 torch threads (the figures move with the
    # kernels), and the guard fired.
    seed_everything(0)
    data = FashionMNISTDataModule(batch_size=128, train_size=5000, val_size=1000, seed=0, return_index=True)
    module = FreeAdversarialModule(
        SmallCNN(), num_classes=10, replays=4, epsilon=EPSILON, delta_memory="example", mean=data.mean, std=data.std,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    assert module.step_size == EPSILON
    weights, guard, gain = _EpochWeights(), CatastrophicOverfittingGuard(epsilon=EPSILON, threshold=0.2), _EpochGain()
    trainer = quiet_trainer(max_epochs=6, limit_val_batches=0, callbacks=[weights, gain, guard])
    trainer.fit(module, datamodule=data)
    print(f"guard history {guard.history}, best epoch {guard.best_epoch}, fired at epoch {guard.fired_epoch}; "
          f"attack gain {gain.values}")
    assert guard.fired_epoch is not None and guard.fired_epoch < 5, "the guard must stop the collapsing run"
    # The attack-free alarm on the same run: the gain starts healthy and falls below the threshold no later than
    # the epoch the PGD guard fires (measured at 1 thread, seeds 0-2: 1.18-1.23 at epoch 0, 1.02-1.05 at epoch 1,
    # 0.96-1.01 after; the healthy recipe: 1.14-1.27 at every epoch).
    below = [epoch for epoch, value in enumerate(gain.values) if value < GAIN_THRESHOLD]
    assert gain.values[0] > GAIN_THRESHOLD + 0.05 and below and below[0] <= guard.fired_epoch, gain.values
    assert guard.history[-1] < guard.best_accuracy - 0.2 and trainer.current_epoch == guard.fired_epoch + 1
    best = weights.weights[guard.best_epoch]
    assert all(torch.equal(module.state_dict()[key], value) for key, value in best.items()), "best weights back"
    assert not all(torch.equal(weights.weights[-1][key], value) for key, value in best.items())
