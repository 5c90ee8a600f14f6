"""The attack-free collapse signals the training modules log per epoch: the gradient alignment every attacking module
logs (``train/grad_alignment``) and Free-m's attack gain (``train/attack_gain``), against hand computations on a small
model, and their place in checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from conftest import quiet_trainer, tiny_cnn, tiny_dataset, tiny_loader
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, NoiseFGSMModule, pgd

EPSILON = 0.1


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _cosines(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-example cosine, written out: <a, b> / (|a| |b|) over all non-batch dimensions."""
    a, b = first.flatten(1).double(), second.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


class _EpochAlignment(Callback):
    """Each epoch's alignment (``values``) and attack gain (``gains``), read before the module logs and resets them."""

    def __init__(self) -> None:
        self.values, self.gains = [], []

    def on_train_epoch_end(self, trainer, module):
        self.values.append(module.grad_alignment())
        self.gains.append(module.attack_gain())


def test_free_m_alignment_and_gain_are_the_replays_cosines_and_last_over_first_losses():
    replays, step_size = 3, 0.03
    backbone = tiny_cnn()
    reference = copy.deepcopy(backbone)
    module = FreeAdversarialModule(backbone, 3, replays=replays, epsilon=EPSILON, step_size=step_size, optimizer=_sgd)
    recorder = _EpochAlignment()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=tiny_loader())  # batches of 4, 4 and 2

    optimizer, delta, cosines, gains = _sgd(reference.parameters()), None, [], []
    for x, y in tiny_loader():
        delta = torch.zeros_like(x) if delta is None else delta
        previous, losses = None, []
        for _ in range(replays):
            leaf = delta[: x.shape[0]].clone().requires_grad_(True)
            loss = F.cross_entropy(reference((x + leaf).clamp(0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if previous is not None:
                cosines.append(_cosines(previous, leaf.grad))
            previous = leaf.grad.clone()
            delta[: x.shape[0]] = (leaf + step_size * leaf.grad.sign()).clamp(-EPSILON, EPSILON).detach()
        gains.append(losses[-1] / losses[0])  # the attack gain: each batch's last replay's loss over its first's
    expected, gain = torch.cat(cosines).mean().item(), sum(gains) / len(gains)
    assert len(torch.cat(cosines)) == 10 * (replays - 1) and gain != pytest.approx(1.0, abs=1e-3)
    assert recorder.values == [pytest.approx(expected, abs=1e-6)] and recorder.gains == [pytest.approx(gain, abs=1e-6)]
    assert trainer.callback_metrics["train/grad_alignment"].item() == pytest.approx(expected, abs=1e-6)
    assert trainer.callback_metrics["train/attack_gain"].item() == pytest.approx(gain, abs=1e-6)


def test_fgsm_rs_alignment_is_the_cosine_between_the_attack_gradient_and_the_gradient_at_the_adversarial_batch():
    backbone = tiny_cnn()
    reference = copy.deepcopy(backbone)
    starts = []

    class _Recorded(FastAdversarialModule):
        def initial_perturbation(self, x):
            starts.append(super().initial_perturbation(x))
            return starts[-1]

    module = _Recorded(backbone, 3, epsilon=EPSILON, step_size=0.125, optimizer=_sgd)
    recorder = _EpochAlignment()
    quiet_trainer(max_epochs=1, callbacks=[recorder]).fit(module, train_dataloaders=tiny_loader())

    optimizer, cosines = _sgd(reference.parameters()), []
    for (x, y), start in zip(tiny_loader(), starts, strict=True):
        # The attack gradient as the reference code takes it: δ a leaf, the summed loss, its gradient.
        delta = ((x + start).clamp(0, 1) - x).requires_grad_(True)
        attack_grad = torch.autograd.grad(F.cross_entropy(reference(x + delta), y, reduction="sum"), delta)[0]
        x_adv = pgd(reference, x, y, epsilon=EPSILON, step_size=0.125, steps=1, init=start, model_mode="train")
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(reference(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cosines.append(_cosines(attack_grad, x_adv.grad))
    assert recorder.values == [pytest.approx(torch.cat(cosines).mean().item(), abs=1e-6)]


def test_pgd_returns_the_last_steps_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    start = torch.zeros_like(x)
    x_adv, grad = pgd(model, x, y, epsilon=0.1, step_size=0.05, steps=2, init=start, return_gradient=True)
    middle = pgd(model, x, y, epsilon=0.1, step_size=0.05, steps=1, init=start)
    middle.requires_grad_(True)
    expected = torch.autograd.grad(F.cross_entropy(model(middle), y, reduction="sum"), middle)[0]
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(x_adv, pgd(model, x, y, epsilon=0.1, step_size=0.05, steps=2, init=start))
    assert pgd(model, x, y, epsilon=0.1, step_size=0.05, steps=0, return_gradient=True)[1] is None
    with pytest.raises(ValueError, match="return_gradient=True needs restarts=1"):
        pgd(model, x, y, epsilon=0.1, step_size=0.05, steps=2, restarts=2, return_gradient=True)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=EPSILON, optimizer=_sgd), id="free"),
        pytest.param(lambda: FastAdversarialModule(tiny_cnn(), 3, epsilon=EPSILON, optimizer=_sgd), id="fgsm-rs"),
        pytest.param(lambda: NoiseFGSMModule(tiny_cnn(), 3, epsilon=EPSILON, optimizer=_sgd), id="n-fgsm"),
    ],
)
def test_every_single_step_trainer_logs_an_alignment_in_minus_one_to_one_each_epoch(make):
    recorder = _EpochAlignment()
    quiet_trainer(max_epochs=2, callbacks=[recorder]).fit(make(), train_dataloaders=tiny_loader())
    assert len(recorder.values) == 2 and all(-1 <= value <= 1 for value in recorder.values)


def test_natural_training_records_no_alignment():
    module = NaturalModule(tiny_cnn(), 3, optimizer=_sgd)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, train_dataloaders=tiny_loader())
    assert module.grad_alignment() is None and "train/grad_alignment" not in trainer.callback_metrics


@pytest.mark.parametrize(
    ("make", "steps_per_batch"),
    [
        (lambda: FastAdversarialModule(tiny_cnn(), 3, epsilon=EPSILON, optimizer=_sgd), 1),
        (lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=3, epsilon=EPSILON, step_size=0.03, optimizer=_sgd), 3),
    ],
    ids=["fgsm-rs", "free-m3"],
)
def test_a_mid_epoch_checkpoint_keeps_the_epochs_sums(tmp_path, make, steps_per_batch):
    """Resumed after its second batch, the epoch's signals are the uninterrupted run's (all three batches)."""

    def loader():  # resumable: the resumed epoch goes on with the batches that were left
        return StatefulDataLoader(tiny_dataset(10), batch_size=4, shuffle=False)

    straight = _EpochAlignment()
    two_batches = 2 * steps_per_batch
    every_two_batches = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=two_batches, save_top_k=-1, filename="{step}"
    )
    quiet_trainer(max_epochs=1, callbacks=[straight, every_two_batches], enable_checkpointing=True).fit(
        make(), train_dataloaders=loader()
    )
    resumed = _EpochAlignment()
    quiet_trainer(max_epochs=1, callbacks=[resumed]).fit(
        make(), train_dataloaders=loader(), ckpt_path=tmp_path / f"step={two_batches}.ckpt"
    )
    assert resumed.values == [pytest.approx(straight.values[0], abs=1e-9)]
    gain = straight.gains[0]
    assert resumed.gains == [None if gain is None else pytest.approx(gain, abs=1e-9)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=1, epsilon=EPSILON, optimizer=_sgd),
        lambda: FastAdversarialModule(tiny_cnn(), 3, epsilon=EPSILON, optimizer=_sgd),
    ],
    ids=["free-m1", "fgsm-rs"],
)
def test_only_free_m_with_several_replays_records_a_gain(make):
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder := _EpochAlignment()])
    trainer.fit(make(), train_dataloaders=tiny_loader())
    assert recorder.gains == [None] and "train/attack_gain" not in trainer.callback_metrics
