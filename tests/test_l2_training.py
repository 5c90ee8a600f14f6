"""The trainers in the L2 threat model, against hand-written loops with the L2 step and projection written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import against_a_copy, assert_same_weights, quiet_trainer, tiny_cnn, tiny_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NoiseFGSMModule, PGDAdversarialModule

EPSILON, STEP = 0.5, 0.2  # an L2 radius on 1×6×6 images; the step differs from ε so that mixing them up shows


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def l2_ascend(delta, grad, alpha):
    """δ + α · g / max(‖g‖₂, 1e-12), per example."""
    norms = torch.stack([row.norm() for row in grad]).clamp_min(1e-12)
    return delta + alpha * grad / norms.view(-1, *[1] * (grad.dim() - 1))


def l2_project(delta, epsilon):
    """δ · min(1, ε / ‖δ‖₂), per example (δ = 0 stays 0)."""
    rows = []
    for row in delta:
        norm = row.norm()
        rows.append(row if norm <= epsilon else row * (epsilon / norm))
    return torch.stack(rows)


def reference_l2_free(model, batches, *, replays, epsilon, step_size, keyed_by_index=False):
    """Algorithm 2 with the L2 step and projection: a batch-sized δ, or (``keyed_by_index``) one δ per image."""
    optimizer = _sgd(model.parameters())
    memory = None
    for batch in batches:
        x, y = batch[0], batch[1]
        if keyed_by_index:
            if memory is None:
                memory = torch.zeros(10, *x.shape[1:])
            noise = memory[batch[2]].clone()
        else:
            if memory is None:
                memory = torch.zeros_like(x)
            noise = memory[: len(x)].clone()
        for _ in range(replays):
            leaf = noise.clone().requires_grad_(True)
            loss = F.cross_entropy(model((x + leaf).clamp(0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            noise = l2_project(l2_ascend(leaf.detach(), leaf.grad, step_size), epsilon)
            optimizer.step()
        if keyed_by_index:
            memory[batch[2]] = noise
        else:
            memory[: len(x)] = noise
    return memory


@pytest.mark.parametrize("memory", ["batch", "example"])
def test_free_in_l2_equals_algorithm_2_with_the_l2_step(memory):
    module, reference_model = against_a_copy(
        FreeAdversarialModule, replays=3, epsilon=EPSILON, step_size=STEP, norm="l2", delta_memory=memory
    )
    x, y = tiny_loader().dataset.tensors
    dataset = TensorDataset(x, y, torch.arange(len(x)))
    order = torch.Generator().manual_seed(3)
    loader = DataLoader(
        dataset if memory == "example" else TensorDataset(x, y), batch_size=4, shuffle=True, generator=order
    )
    quiet_trainer(max_epochs=2).fit(module, train_dataloaders=loader)
    replay_order = torch.Generator().manual_seed(3)
    batches = [
        batch for _ in range(2) for batch in DataLoader(dataset, batch_size=4, shuffle=True, generator=replay_order)
    ]
    expected = reference_l2_free(
        reference_model, batches, replays=3, epsilon=EPSILON, step_size=STEP, keyed_by_index=memory == "example"
    )
    torch.testing.assert_close(module.delta, expected, atol=1e-6, rtol=0)
    assert_same_weights(module, reference_model)
    norms = module.delta.flatten(1).norm(dim=1)
    assert (norms <= EPSILON + 1e-6).all() and norms.max() > EPSILON / 2, "δ moved, and stayed in the L2 ball"
    assert module.delta.abs().max() > 0.2, "an L2 step moves pixels by more than an L∞ bound of the same size would"


def test_free_l2_start_noise_is_drawn_inside_the_ball():
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=1, epsilon=2.0, norm="l2", delta_start_noise=1.0)
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=tiny_loader())
    assert (module.delta.flatten(1).norm(dim=1) <= 2.0 + 1e-5).all()


def _kpgd_reference(model, batches, *, steps, epsilon, step_size):
    optimizer = _sgd(model.parameters())
    for x, y in batches:
        x_adv = x.clone()
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
            x_adv = (x + l2_project(l2_ascend(x_adv.detach(), grad, step_size) - x, epsilon)).clamp(0, 1)
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_kpgd_in_l2_equals_a_hand_written_l2_pgd_training_loop():
    module, reference_model = against_a_copy(
        PGDAdversarialModule, steps=3, epsilon=EPSILON, step_size=STEP, norm="l2", random_start=False
    )
    quiet_trainer(max_epochs=2).fit(module, train_dataloaders=tiny_loader())
    _kpgd_reference(reference_model, [*tiny_loader(), *tiny_loader()], steps=3, epsilon=EPSILON, step_size=STEP)
    assert_same_weights(module, reference_model)


class _Starts(FastAdversarialModule):
    """Keeps every start it draws and every batch the optimizer steps on."""

    def initial_perturbation(self, x):
        start = super().initial_perturbation(x)
        self.starts = [*getattr(self, "starts", []), start.clone()]
        return start

    def fit_step(self, inputs, y, *args, **kwargs):
        self.seen = [*getattr(self, "seen", []), inputs.detach().clone()]
        return super().fit_step(inputs, y, *args, **kwargs)


def test_fgsm_rs_in_l2_starts_inside_the_ball_and_takes_one_normalised_step():
    module = _Starts(tiny_cnn(), 3, epsilon=EPSILON, norm="l2")
    assert module.step_size == pytest.approx(1.25 * EPSILON)
    quiet_trainer(max_epochs=1).fit(module, train_dataloaders=tiny_loader())
    starts = torch.cat(module.starts)
    radii = starts.flatten(1).norm(dim=1)
    assert (radii <= EPSILON + 1e-6).all() and radii.min() < 0.9 * EPSILON, "inside the ball, not on its surface"
    for (x, _), x_adv in zip(tiny_loader(), module.seen, strict=True):
        assert ((x_adv - x).flatten(1).norm(dim=1) <= EPSILON + 1e-5).all()
        assert (x_adv - x).abs().max() > 0.15, "an L2 step, not an L∞ step of ε"


def test_nfgsm_in_l2_draws_l2_noise_and_takes_an_l2_step():
    module = NoiseFGSMModule(tiny_cnn(), 3, epsilon=EPSILON, norm="l2")
    x, y = next(iter(tiny_loader()))
    module.model.set_statistics([0.0], [1.0])
    x_adv, _ = module._perturb(x, y)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    # noise of radius ≤ kε = 1.0, then a step of α = ε: at most 1.5 from x (the clamp to [0, 1] only shrinks it)
    assert (norms <= 3 * EPSILON + 1e-5).all() and norms.max() > EPSILON


def test_an_l2_radius_above_one_is_accepted_and_a_bad_one_refused():
    assert FreeAdversarialModule(nn.Linear(1, 2), 2, epsilon=3.0, norm="l2").epsilon == 3.0
    with pytest.raises(ValueError, match="epsilon must be a finite number ≥ 0"):
        FreeAdversarialModule(nn.Linear(1, 2), 2, epsilon=float("inf"), norm="l2")
    with pytest.raises(ValueError, match=r"norm must be one of 'linf', 'l2', got 'l1'"):
        PGDAdversarialModule(nn.Linear(1, 2), 2, norm="l1")
