"""The training losses (freeadv_pl/losses.py) and TRADES in each trainer, against loops written in the style of the
TRADES authors' ``trades.py`` here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import against_a_copy, assert_same_weights, quiet_trainer, tiny_loader
from torch import nn

from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, PGDAdversarialModule
from freeadv_pl.losses import TRADES, CrossEntropy, TrainingLoss, training_loss

BETA, EPSILON, STEP = 6.0, 0.1, 0.03


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def trades_loss(model, x, x_adv, y, beta):
    """The authors' outer loss: CE on the clean batch plus β · KLDivLoss(size_average=False) / batch size."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    logits = model(x)
    loss_robust = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1)) / len(x)
    return F.cross_entropy(logits, y) + beta * loss_robust


def test_trades_equals_the_authors_formula_and_ce_is_plain_cross_entropy():
    torch.manual_seed(0)
    clean, adversarial, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    criterion_kl = nn.KLDivLoss(reduction="sum")
    expected = (
        F.cross_entropy(clean, y) + BETA * criterion_kl(F.log_softmax(adversarial, dim=1), F.softmax(clean, dim=1)) / 5
    )
    torch.testing.assert_close(TRADES(BETA)(adversarial, y, clean), expected)
    torch.testing.assert_close(CrossEntropy()(adversarial, y), F.cross_entropy(adversarial, y))
    attack = TRADES(BETA).attack_loss(clean)
    torch.testing.assert_close(attack(adversarial, y), criterion_kl(F.log_softmax(adversarial, 1), F.softmax(clean, 1)))


def reference_trades_pgd(model, batches, starts, *, steps, epsilon, step_size, beta):
    """K-PGD TRADES as ``trades.py`` writes it (L∞), from the start each batch drew (clamped to [0, 1])."""
    optimizer = _sgd(model.parameters())
    criterion_kl = nn.KLDivLoss(reduction="sum")
    for (x, y), start in zip(batches, starts, strict=True):
        model.eval()
        x_adv = torch.clamp(x + start, 0.0, 1.0)
        for _ in range(steps):
            x_adv.requires_grad_()
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        optimizer.zero_grad()
        loss = trades_loss(model, x, x_adv, y, beta)
        loss.backward()
        optimizer.step()


def _recording(module_class):
    class Recording(module_class):
        def initial_perturbation(self, x):
            start = super().initial_perturbation(x)
            self.starts = [*getattr(self, "starts", []), start.clone()]
            return start

    return Recording


def test_kpgd_trades_equals_the_authors_loop_from_the_same_starts():
    module, reference_model = against_a_copy(
        _recording(PGDAdversarialModule),
        steps=3,
        epsilon=EPSILON,
        step_size=STEP,
        loss="trades",
        trades_beta=BETA,
    )
    assert module.attack_mode == "eval" and module.passes_per_batch == 5
    quiet_trainer(max_epochs=2).fit(module, train_dataloaders=tiny_loader())
    starts = torch.cat(module.starts)
    assert 0.0005 < starts.std() < 0.002, "the authors' start: 0.001 · N(0, I)"
    batches = [*tiny_loader(), *tiny_loader()]
    reference_trades_pgd(reference_model, batches, module.starts, steps=3, epsilon=EPSILON, step_size=STEP, beta=BETA)
    assert_same_weights(module, reference_model)


def test_fgsm_rs_trades_takes_one_kl_step_from_its_uniform_start():
    module, reference_model = against_a_copy(_recording(FastAdversarialModule), epsilon=EPSILON, loss="trades")
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=tiny_loader())
    starts = torch.cat(module.starts)
    assert starts.abs().max() <= EPSILON and starts.abs().max() > EPSILON / 2, "FGSM-RS's usual U(-ε, ε) start"
    reference_trades_pgd(
        reference_model,
        list(tiny_loader()),
        module.starts,
        steps=1,
        epsilon=EPSILON,
        step_size=1.25 * EPSILON,
        beta=6.0,
    )
    assert_same_weights(module, reference_model)


def reference_free_trades(model, loader, *, epochs, replays, epsilon, step_size, beta):
    """Free-m with the TRADES loss, written by hand: each replay's one backward of CE(f(x)) + β·KL(f(x) ‖ f(x + δ))
    steps the weights and gives δ's gradient (through the KL term only)."""
    optimizer = _sgd(model.parameters())
    noise = None
    for _ in range(epochs):
        for x, y in loader:
            if noise is None:
                noise = torch.zeros_like(x)
            for _ in range(replays):
                leaf = noise[: len(x)].clone().requires_grad_(True)
                loss = trades_loss(model, x, (x + leaf).clamp(0, 1), y, beta)
                optimizer.zero_grad()
                loss.backward()
                noise[: len(x)] = (leaf.detach() + step_size * leaf.grad.sign()).clamp(-epsilon, epsilon)
                optimizer.step()
    return noise


def test_free_trades_equals_a_hand_written_free_trades_loop():
    module, reference_model = against_a_copy(
        FreeAdversarialModule,
        replays=3,
        epsilon=EPSILON,
        step_size=STEP,
        loss="trades",
        trades_beta=BETA,
    )
    assert module.passes_per_batch == 6
    quiet_trainer(max_epochs=2).fit(module, train_dataloaders=tiny_loader())
    expected = reference_free_trades(
        reference_model, tiny_loader(), epochs=2, replays=3, epsilon=EPSILON, step_size=STEP, beta=BETA
    )
    torch.testing.assert_close(module.delta, expected, atol=1e-6, rtol=0)
    assert module.delta.abs().max() > 0
    assert_same_weights(module, reference_model)


class _Weighted(TrainingLoss):
    """A user's loss: CE at the adversarial point plus half the CE at the clean one."""

    name = "weighted"
    needs_clean = True

    def __call__(self, adversarial, y, clean=None):
        return F.cross_entropy(adversarial, y) + 0.5 * F.cross_entropy(clean, y)


def test_a_users_own_loss_plugs_into_free_m():
    module, reference_model = against_a_copy(FreeAdversarialModule, replays=2, epsilon=EPSILON, loss=_Weighted())
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=tiny_loader())
    optimizer, noise = _sgd(reference_model.parameters()), None
    for x, y in tiny_loader():
        noise = torch.zeros_like(x) if noise is None else noise
        for _ in range(2):
            leaf = noise[: len(x)].clone().requires_grad_(True)
            loss = F.cross_entropy(reference_model((x + leaf).clamp(0, 1)), y)
            loss = loss + 0.5 * F.cross_entropy(reference_model(x), y)
            optimizer.zero_grad()
            loss.backward()
            noise[: len(x)] = (leaf.detach() + EPSILON * leaf.grad.sign()).clamp(-EPSILON, EPSILON)
            optimizer.step()
    torch.testing.assert_close(module.delta, noise, atol=1e-6, rtol=0)


def test_loss_names_and_bad_values():
    assert isinstance(training_loss("ce"), CrossEntropy) and training_loss("trades", 2.0).beta == 2.0
    with pytest.raises(ValueError, match="loss must be one of 'ce', 'trades', got 'mse'"):
        training_loss("mse")
    with pytest.raises(ValueError, match="trades_beta must be a finite number ≥ 0, got -1"):
        FreeAdversarialModule(nn.Linear(1, 2), 2, loss="trades", trades_beta=-1)
    with pytest.raises(ValueError, match="TRADES needs the clean logits"):
        TRADES()(torch.zeros(1, 2), torch.tensor([0]))
