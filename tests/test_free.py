"""FreeAdversarialModule against a hand-written Algorithm 2 loop, and the semantics of δ."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import ExplodingNet, quiet_trainer, tiny_cnn, tiny_loader
from freeadv_pl import FreeAdversarialModule

MEAN, STD = (0.4,), (0.3,)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _schedule(optimizer):
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 11], gamma=0.5)


def reference_free_training(model: nn.Module, loader, *, epochs, replays, epsilon, step_size) -> torch.Tensor:
    """Algorithm 2 written the way the official PyTorch code writes it (a global noise tensor, in-place updates)."""
    optimizer = _sgd(model.parameters())
    scheduler = _schedule(optimizer)
    mean, std = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    global_noise = None
    for _ in range(epochs):
        for x, y in loader:
            if global_noise is None:
                global_noise = torch.zeros_like(x)
            for _ in range(replays):
                noise_batch = global_noise[: x.size(0)].clone().requires_grad_(True)
                inputs = (x + noise_batch).clamp(0, 1)
                loss = F.cross_entropy(model((inputs - mean) / std), y)
                optimizer.zero_grad()
                loss.backward()
                global_noise[: x.size(0)] += step_size * torch.sign(noise_batch.grad)
                global_noise.clamp_(-epsilon, epsilon)
                optimizer.step()
                scheduler.step()
    return global_noise


@pytest.mark.parametrize("replays", [1, 3])
def test_matches_the_reference_loop_of_algorithm_2(replays):
    epsilon, step_size, epochs = 0.1, 0.03, 2  # step ≠ ε, so that mixing them up shows
    backbone = tiny_cnn()
    reference_model = copy.deepcopy(backbone)
    module = FreeAdversarialModule(
        backbone, 3, replays=replays, epsilon=epsilon, step_size=step_size, mean=MEAN, std=STD,
        optimizer=_sgd, lr_scheduler=_schedule,
    )
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(module, train_dataloaders=tiny_loader())  # batches of 4, 4 and 2
    reference_delta = reference_free_training(
        reference_model, tiny_loader(), epochs=epochs, replays=replays, epsilon=epsilon, step_size=step_size
    )
    assert trainer.global_step == replays * 3 * epochs
    torch.testing.assert_close(module.delta, reference_delta, atol=1e-6, rtol=0)
    for ours, theirs in zip(module.model.backbone.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert module.delta.abs().max() > 0


class _DeltaRecorder(Callback):
    def __init__(self) -> None:
        self.before, self.after = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(None if module.delta is None else module.delta.clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(module.delta.clone())


def test_delta_is_bounded_and_carried_across_batches_and_epochs():
    epsilon = 0.05
    recorder = _DeltaRecorder()
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=4, epsilon=epsilon)
    assert module.delta is None
    trainer = quiet_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=tiny_loader())
    assert trainer.global_step == 4 * 3 * 2  # replays × batches × epochs
    assert recorder.before[0] is None
    for previous_end, next_start in zip(recorder.after[:-1], recorder.before[1:], strict=True):
        assert torch.equal(previous_end, next_start), "δ must carry over between batches (and epochs), unchanged"
    for delta in recorder.after:
        assert delta.abs().max() <= epsilon + 1e-7
    # With ε_step = ε the sign steps reach the bound.
    assert recorder.after[-1].abs().max() == pytest.approx(epsilon)
    # The last batch has 2 examples: it updates δ[:2] only.
    last_start, last_end = recorder.before[2], recorder.after[2]
    assert torch.equal(last_start[2:], last_end[2:]) and not torch.equal(last_start[:2], last_end[:2])


def test_a_larger_batch_grows_delta_with_a_warning():
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=1, epsilon=0.1)
    quiet_trainer().fit(module, train_dataloaders=tiny_loader(n=4, batch_size=4))
    old = module.delta.clone()
    with pytest.warns(UserWarning, match="larger than the stored perturbation"):
        grown = module._delta.for_batch(torch.zeros(6, 1, 6, 6))
    assert grown.shape[0] == 6 and torch.equal(module.delta[:4], old) and not grown[4:].any()
    with pytest.raises(ValueError, match="input shape changed"):
        module._delta.for_batch(torch.zeros(2, 1, 8, 8))


def test_delta_survives_a_checkpoint(tmp_path):
    module = FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=0.1)
    trainer = quiet_trainer()
    trainer.fit(module, train_dataloaders=tiny_loader())
    trainer.save_checkpoint(tmp_path / "free.ckpt")
    restored = FreeAdversarialModule.load_from_checkpoint(tmp_path / "free.ckpt", backbone=tiny_cnn(seed=1))
    assert torch.equal(restored.delta, module.delta)


def test_a_replay_with_a_non_finite_delta_gradient_leaves_delta_unchanged():
    net = ExplodingNet()
    module = FreeAdversarialModule(
        net, 3, replays=2, epsilon=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), on_nonfinite_loss="skip"
    )
    quiet_trainer().fit(module, train_dataloaders=tiny_loader(n=4))
    before = module.delta.clone()
    net.explode = True
    quiet_trainer().fit(module, train_dataloaders=tiny_loader(n=4))
    assert torch.isfinite(module.delta).all() and torch.equal(module.delta, before)
