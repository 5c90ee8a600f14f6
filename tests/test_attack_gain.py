"""Free-m's attack gain (``train/attack_gain``: each batch's last-replay loss over its first-replay loss, averaged
over the epoch), against a hand-written Free-m loop, and its place in checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torchdata.stateful_dataloader import StatefulDataLoader

from conftest import quiet_trainer, tiny_cnn, tiny_dataset, tiny_loader
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule

EPSILON = 0.1


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class _EpochGain(Callback):
    def __init__(self) -> None:
        self.values = []

    def on_train_epoch_end(self, trainer, module):
        self.values.append(module.attack_gain())


def test_free_m_attack_gain_is_the_mean_ratio_of_each_batchs_last_replay_loss_to_its_first():
    replays, step_size = 3, 0.03
    backbone = tiny_cnn()
    reference = copy.deepcopy(backbone)
    module = FreeAdversarialModule(backbone, 3, replays=replays, epsilon=EPSILON, step_size=step_size, optimizer=_sgd)
    recorder = _EpochGain()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=tiny_loader())  # batches of 4, 4 and 2

    optimizer, delta, ratios = _sgd(reference.parameters()), None, []
    for x, y in tiny_loader():
        delta = torch.zeros_like(x) if delta is None else delta
        losses = []
        for _ in range(replays):
            leaf = delta[: x.shape[0]].clone().requires_grad_(True)
            loss = F.cross_entropy(reference((x + leaf).clamp(0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            delta[: x.shape[0]] = (leaf + step_size * leaf.grad.sign()).clamp(-EPSILON, EPSILON).detach()
        ratios.append(losses[-1] / losses[0])
    expected = sum(ratios) / len(ratios)
    assert len(ratios) == 3 and expected != pytest.approx(1.0, abs=1e-3)
    assert recorder.values == [pytest.approx(expected, abs=1e-6)]
    assert trainer.callback_metrics["train/attack_gain"].item() == pytest.approx(expected, abs=1e-6)

    trainer.fit(module, train_dataloaders=tiny_loader())
    assert module.attack_gain() is None and "train/attack_gain" not in trainer.callback_metrics, "a new fit starts anew"


@pytest.mark.parametrize(
    "make",
    [
        lambda: FreeAdversarialModule(tiny_cnn(), 3, replays=1, epsilon=EPSILON, optimizer=_sgd),
        lambda: FastAdversarialModule(tiny_cnn(), 3, epsilon=EPSILON, optimizer=_sgd),
    ],
    ids=["free-m1", "fgsm-rs"],
)
def test_only_free_m_with_several_replays_records_a_gain(make):
    module = make()
    trainer = quiet_trainer(max_epochs=1, callbacks=[recorder := _EpochGain()])
    trainer.fit(module, train_dataloaders=tiny_loader())
    assert recorder.values == [None] and "train/attack_gain" not in trainer.callback_metrics


def test_a_mid_epoch_checkpoint_keeps_the_epochs_gain_sums(tmp_path):
    """Resumed after its second batch (6 optimizer steps of Free-3), the epoch's gain is the uninterrupted run's."""

    def make():
        return FreeAdversarialModule(tiny_cnn(), 3, replays=3, epsilon=EPSILON, step_size=0.03, optimizer=_sgd)

    def loader():  # resumable: the resumed epoch goes on with the batches that were left
        return StatefulDataLoader(tiny_dataset(10), batch_size=4, shuffle=False)

    straight = _EpochGain()
    every_six_steps = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    quiet_trainer(max_epochs=1, callbacks=[straight, every_six_steps], enable_checkpointing=True).fit(
        make(), train_dataloaders=loader()
    )
    assert "freeadv_pl_attack_gain" in torch.load(tmp_path / "step=6.ckpt", weights_only=True)
    resumed = _EpochGain()
    quiet_trainer(max_epochs=1, callbacks=[resumed]).fit(
        make(), train_dataloaders=loader(), ckpt_path=tmp_path / "step=6.ckpt"
    )
    assert resumed.values == [pytest.approx(straight.values[0], abs=1e-9)]
