"""PGDAdversarialModule against a hand-written Algorithm 1 loop (Madry et al.'s K-PGD training)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import quiet_trainer, tiny_loader
from freeadv_pl import PGDAdversarialModule


def _net() -> nn.Module:
    torch.manual_seed(0)
    # Batch-norm makes the model's mode during the attack matter.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class _SeededStart(PGDAdversarialModule):
    """Injects the random start through the documented hook, from a seeded generator."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = torch.Generator().manual_seed(123)

    def initial_perturbation(self, x):
        # float32 draws as in the reference: under precision="64-true" the default dtype is float64.
        uniform = torch.rand(x.shape, generator=self.generator, dtype=torch.float32)
        return (uniform * 2 * self.epsilon - self.epsilon).to(x)


def reference_pgd_training(model, loader, *, epochs, steps, epsilon, alpha, attack_in_train_mode):
    """Algorithm 1: fresh U(-ε, ε) start, K signed steps with projection, weights frozen, then one SGD step."""
    optimizer = _sgd(model.parameters())
    generator = torch.Generator().manual_seed(123)
    for _ in range(epochs):
        for x, y in loader:
            delta = torch.rand(x.shape, generator=generator) * 2 * epsilon - epsilon
            delta = (x + delta).clamp(0, 1) - x
            model.train(attack_in_train_mode)
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(x + delta), y)
                grad = torch.autograd.grad(loss, delta)[0]
                delta = (delta.detach() + alpha * grad.sign()).clamp(-epsilon, epsilon)
                delta = (x + delta).clamp(0, 1) - x
            model.train()
            optimizer.zero_grad()
            F.cross_entropy(model(x + delta), y).backward()
            optimizer.step()


@pytest.mark.parametrize("attack_mode", ["train", "eval"])
def test_matches_the_reference_loop_of_algorithm_1(attack_mode):
    epsilon, alpha, steps, epochs = 0.1, 0.03, 3, 2
    backbone = _net()
    reference = copy.deepcopy(backbone)
    module = _SeededStart(
        backbone, 3, steps=steps, epsilon=epsilon, step_size=alpha, attack_mode=attack_mode, optimizer=_sgd
    )
    trainer = quiet_trainer(max_epochs=epochs, precision="64-true")
    trainer.fit(module, train_dataloaders=tiny_loader())
    reference_pgd_training(
        reference.double(), [(x.double(), y) for x, y in tiny_loader()], epochs=epochs, steps=steps,
        epsilon=epsilon, alpha=alpha, attack_in_train_mode=attack_mode == "train",
    )
    assert trainer.global_step == 3 * epochs  # one optimizer step per batch
    for ours, theirs in zip(module.model.backbone.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_default_random_start_stays_within_epsilon():
    module = PGDAdversarialModule(_net(), 3, epsilon=0.05)
    x = torch.rand(8, 1, 6, 6)
    start = module.initial_perturbation(x)
    assert start.abs().max() <= 0.05 and start.std() > 0
    module.random_start = False
    assert not module.initial_perturbation(x).any()
