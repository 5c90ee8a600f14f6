"""FastAdversarialModule (FGSM-RS) against a hand-written loop of Wong et al.'s training step, and its options."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import CountingNet, quiet_trainer, tiny_loader
from freeadv_pl import FastAdversarialModule

EPSILON, ALPHA, EPOCHS = 0.1, 0.07, 2  # α ≠ ε and ≠ 1.25 ε, so that mixing them up shows


def _net() -> nn.Module:
    torch.manual_seed(0)
    # Batch-norm makes the model's mode during the FGSM step matter.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _uniform_starts():
    """δ₀ ~ U(-ε, ε) from a seeded generator, in float32 whatever the default dtype."""
    generator = torch.Generator().manual_seed(123)
    return lambda x: (torch.rand(x.shape, generator=generator, dtype=torch.float32) * 2 * EPSILON - EPSILON).to(x)


class _SeededStart(FastAdversarialModule):
    """Injects the uniform start through the documented hook, from the reference's generator."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draw = _uniform_starts()

    def initial_perturbation(self, x):
        return self.draw(x) if self.init == "uniform" else super().initial_perturbation(x)


def reference_fgsm_training(model, loader, *, init, epochs, step_in_train_mode=True):
    """The FGSM-RS step written as the reference code writes it: δ as a leaf, ``.backward()`` and ``δ.grad``."""
    optimizer = _sgd(model.parameters())
    draw = _uniform_starts()
    previous = None
    for _ in range(epochs):
        for x, y in loader:
            if init == "uniform":
                delta = draw(x)
            elif init == "zero":
                delta = torch.zeros_like(x)
            else:
                previous = torch.zeros_like(x) if previous is None else previous
                delta = previous[: x.shape[0]].clone()
            delta = (x + delta).clamp(0, 1) - x
            delta.requires_grad_(True)
            model.train(step_in_train_mode)
            F.cross_entropy(model(x + delta), y).backward()
            delta = (delta.detach() + ALPHA * delta.grad.sign()).clamp(-EPSILON, EPSILON)
            delta = (x + delta).clamp(0, 1) - x
            if init == "previous":
                previous[: x.shape[0]] = delta
            model.train()
            optimizer.zero_grad()  # drops the weight gradient the FGSM step's backward left
            F.cross_entropy(model(x + delta), y).backward()
            optimizer.step()
    return previous


@pytest.mark.parametrize(
    ("init", "attack_mode"),
    [("uniform", "train"), ("uniform", "eval"), ("zero", "train"), ("previous", "train")],
)
def test_matches_the_reference_fgsm_rs_loop(init, attack_mode):
    backbone = _net()
    reference = copy.deepcopy(backbone)
    module = _SeededStart(
        backbone, 3, epsilon=EPSILON, step_size=ALPHA, init=init, attack_mode=attack_mode, optimizer=_sgd
    )
    trainer = quiet_trainer(max_epochs=EPOCHS, precision="64-true")
    trainer.fit(module, train_dataloaders=tiny_loader())  # batches of 4, 4 and 2
    reference_delta = reference_fgsm_training(
        reference.double(),
        [(x.double(), y) for x, y in tiny_loader()],
        init=init,
        epochs=EPOCHS,
        step_in_train_mode=attack_mode == "train",
    )
    assert trainer.global_step == 3 * EPOCHS  # one optimizer step per batch
    for ours, theirs in zip(module.model.backbone.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
    if init == "previous":
        torch.testing.assert_close(module.delta, reference_delta, atol=1e-12, rtol=0)
    else:
        assert module.delta is None


def test_two_forward_backward_passes_per_batch():
    net = CountingNet()
    quiet_trainer(max_epochs=2).fit(FastAdversarialModule(net, 3, epsilon=0.1), train_dataloaders=tiny_loader())
    assert net.forwards == 2 * 3 * 2  # (FGSM step + training step) × 3 batches × 2 epochs


def test_the_defaults_are_the_papers():
    module = FastAdversarialModule(_net(), 3)
    assert module.epsilon == pytest.approx(8 / 255) and module.step_size == pytest.approx(10 / 255)
    assert (module.init, module.attack_mode) == ("uniform", "train")
    assert FastAdversarialModule(_net(), 3, epsilon=0.9).step_size == 1.0, "1.25 ε, capped at the image range"
    start = module.initial_perturbation(torch.rand(64, 1, 6, 6))
    assert start.abs().max() <= 8 / 255 and start.std() > 0


def test_previous_delta_survives_a_checkpoint(tmp_path):
    module = FastAdversarialModule(_net(), 3, epsilon=0.1, init="previous")
    trainer = quiet_trainer()
    trainer.fit(module, train_dataloaders=tiny_loader())
    assert module.delta.shape == (4, 1, 6, 6) and module.delta.abs().max() <= 0.1 + 1e-7 and module.delta.any()
    trainer.save_checkpoint(tmp_path / "fast.ckpt")
    restored = FastAdversarialModule.load_from_checkpoint(tmp_path / "fast.ckpt", backbone=_net())
    assert restored.init == "previous" and torch.equal(restored.delta, module.delta)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"init": "random"}, ValueError, "init must be one of 'uniform', 'zero', 'previous'", id="init"),
        pytest.param({"step_size": 0}, ValueError, r"step_size must lie in \(0, 1\]", id="step"),
        pytest.param({"epsilon": "8/255x"}, ValueError, "epsilon must be a number in", id="epsilon-string"),
        pytest.param({"epsilon": 1.5}, ValueError, r"epsilon must lie in \[0, 1\]", id="epsilon-range"),
        pytest.param({"attack_mode": "test"}, ValueError, "attack_mode must be one of", id="mode"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastAdversarialModule(_net(), 3, **kwargs)
