"""NoiseFGSMModule (N-FGSM) against a hand-written loop of de Jorge et al.'s training step, and its options."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CountingNet, quiet_trainer, tiny_cnn, tiny_dataset, tiny_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import NoiseFGSMModule
from freeadv_pl._step_random import step_seed

EPSILON, ALPHA, K, EPOCHS, SEED = 0.1, 0.07, 2.5, 2, 7  # α ≠ ε and k ≠ 2, so that mixing them up shows


def _net() -> nn.Module:
    torch.manual_seed(0)
    # Batch-norm makes the model's mode during the FGSM step matter.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def reference_nfgsm_training(model, loader, *, epochs, clip, attack_in_train_mode):
    """N-FGSM written as the authors' loop writes it, with the noise of each optimizer step drawn from the generator
    the module seeds for that step. Returns the weights after the first step."""
    optimizer = _sgd(model.parameters())
    step, first = 0, None
    for _ in range(epochs):
        for x, y in loader:
            generator = torch.Generator().manual_seed(step_seed(SEED, 0, step))
            eta = torch.empty_like(x).uniform_(-K * EPSILON, K * EPSILON, generator=generator)
            delta = eta.requires_grad_(True)
            model.train(attack_in_train_mode)
            loss = F.cross_entropy(model(torch.clamp(x + delta, 0, 1)), y)
            grad = torch.autograd.grad(loss, delta)[0].detach()
            delta = eta.detach() + ALPHA * torch.sign(grad)
            if clip is not None:
                delta = torch.clamp(delta, -clip, clip)
            x_adv = torch.clamp(x + delta, 0, 1)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            first = copy.deepcopy(model.state_dict()) if first is None else first
    return first


class _FirstStepWeights(Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.weights = copy.deepcopy(module.model.backbone.state_dict())


def _assert_same_weights(ours: dict, theirs: dict) -> None:
    for (key, mine), reference in zip(ours.items(), theirs.values(), strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-9, rtol=1e-9, msg=key)


@pytest.mark.parametrize(
    ("attack_mode", "clip"),
    [
        pytest.param("train", None, id="train"),
        pytest.param("eval", None, id="eval"),
        pytest.param("train", 0.15, id="clip"),
    ],
)
def test_matches_the_reference_nfgsm_loop_after_one_and_after_several_steps(attack_mode, clip):
    backbone = _net()
    reference = copy.deepcopy(backbone).double()
    module = NoiseFGSMModule(
        backbone, 3, epsilon=EPSILON, step_size=ALPHA, noise_scale=K, clip=clip, attack_mode=attack_mode, optimizer=_sgd
    )
    first_step = _FirstStepWeights()
    trainer = quiet_trainer(max_epochs=EPOCHS, precision="64-true", callbacks=[first_step])
    torch.manual_seed(SEED)  # the run's seed, from which the module seeds each step's noise
    trainer.fit(module, train_dataloaders=tiny_loader())  # batches of 4, 4 and 2
    reference_first = reference_nfgsm_training(
        reference,
        [(x.double(), y) for x, y in tiny_loader()],
        epochs=EPOCHS,
        clip=clip,
        attack_in_train_mode=attack_mode == "train",
    )
    assert trainer.global_step == 3 * EPOCHS  # one optimizer step per batch
    _assert_same_weights(first_step.weights, reference_first)
    _assert_same_weights(module.model.backbone.state_dict(), reference.state_dict())
    assert not torch.equal(first_step.weights["4.weight"], backbone.state_dict()["4.weight"])


class _Recording(NoiseFGSMModule):
    """Keeps every batch the optimizer steps on."""

    def fit_step(self, inputs, y, *args, **kwargs):
        self.seen = [*getattr(self, "seen", []), inputs.detach().clone()]
        return super().fit_step(inputs, y, *args, **kwargs)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_without_clip_the_perturbation_leaves_the_epsilon_ball_and_with_clip_it_stays_within_clip(clip):
    module = _Recording(tiny_cnn(), 3, epsilon=EPSILON, clip=clip)
    quiet_trainer().fit(module, train_dataloaders=tiny_loader())
    x = torch.cat([x for x, _ in tiny_loader()])
    x_adv = torch.cat(module.seen)
    gap = (x_adv - x).abs().max().item()
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    if clip is None:
        assert EPSILON < gap <= (2 + 1) * EPSILON + 1e-6  # noise 2ε plus the step ε
    else:
        assert gap <= clip + 1e-6


def test_two_forward_backward_passes_per_batch():
    net = CountingNet()
    module = NoiseFGSMModule(net, 3, epsilon=EPSILON)
    assert module.passes_per_batch == 2
    quiet_trainer().fit(module, train_dataloaders=tiny_loader())
    assert net.forwards == 2 * 3  # (FGSM step + training step) × 3 batches


def test_batches_with_dataset_positions_train_as_plain_batches():
    plain, indexed = NoiseFGSMModule(tiny_cnn(), 3), NoiseFGSMModule(tiny_cnn(), 3)
    x, y = tiny_dataset().tensors
    for module, loader in [
        (plain, tiny_loader()),
        (indexed, DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=4, shuffle=False)),
    ]:
        torch.manual_seed(SEED)
        quiet_trainer().fit(module, train_dataloaders=loader)
    for ours, theirs in zip(indexed.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs)


def test_the_defaults_are_the_papers():
    module = NoiseFGSMModule(_net(), 3)
    assert module.epsilon == pytest.approx(8 / 255) and module.step_size == module.epsilon
    assert (module.noise_scale, module.clip, module.attack_mode) == (2.0, None, "train")
    assert NoiseFGSMModule(_net(), 3, epsilon=0).step_size == 0, "no projection to undo a step at ε = 0"
    assert NoiseFGSMModule(_net(), 3, epsilon=0.4).noise_scale * 0.4 > 0.5, "noise wider than half the image range"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"noise_scale": -1}, ValueError, "noise_scale must be a finite number ≥ 0", id="noise-negative"),
        pytest.param({"noise_scale": float("inf")}, ValueError, "noise_scale must be a finite", id="noise-inf"),
        pytest.param({"noise_scale": "2"}, TypeError, "noise_scale must be a finite number", id="noise-type"),
        pytest.param({"clip": 0}, ValueError, r"clip must lie in \(0, 1\].*clip=None", id="clip-zero"),
        pytest.param({"clip": -0.1}, ValueError, r"clip must lie in \(0, 1\]", id="clip-negative"),
        pytest.param({"step_size": 1.5}, ValueError, r"step_size must lie in \[0, 1\]", id="step"),
        pytest.param({"epsilon": "8/255x"}, ValueError, "epsilon must be a number in", id="epsilon-string"),
        pytest.param({"attack_mode": "test"}, ValueError, "attack_mode must be one of 'train', 'eval'", id="mode"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        NoiseFGSMModule(_net(), 3, **kwargs)


@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization:UserWarning")
def test_resuming_at_an_epoch_boundary_draws_the_uninterrupted_runs_noise(tmp_path):
    def fit(seed: int, epochs: int, ckpt_path=None, callbacks=()):
        module = NoiseFGSMModule(tiny_cnn(seed=seed), 3, epsilon=EPSILON, optimizer=_sgd)  # seeds the run: seed
        trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        trainer.fit(module, train_dataloaders=tiny_loader(n=4, batch_size=2), ckpt_path=ckpt_path)  # 2 steps/epoch
        assert trainer.global_step == 2 * epochs
        return module

    whole = fit(seed=0, epochs=2)
    fit(seed=0, epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed = fit(seed=1, epochs=2, ckpt_path=tmp_path / "last.ckpt")  # another seed: the noise's must be restored
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
