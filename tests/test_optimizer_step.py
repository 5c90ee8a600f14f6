"""What happens to the weight gradient between the backward pass and the optimizer step: clipping
(``gradient_clip_norm``) and non-finite losses (``on_nonfinite_loss``), for every training module, on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_cnn, tiny_dataset, tiny_loader
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule


class RecordingSGD(torch.optim.SGD):
    """SGD that records the L2 norm of the whole gradient it steps with (after Lightning's hooks have run)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.norms: list[float] = []

    def step(self, closure=None):
        if closure is not None:  # Lightning's closure runs on_before_optimizer_step, where the module clips
            with torch.enable_grad():
                closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step()


MODULES = {
    "natural": lambda **kwargs: NaturalModule(tiny_cnn(), 3, **kwargs),
    "free": lambda **kwargs: FreeAdversarialModule(tiny_cnn(), 3, replays=2, epsilon=0.1, **kwargs),
    "pgd": lambda **kwargs: PGDAdversarialModule(tiny_cnn(), 3, steps=2, epsilon=0.1, step_size=0.05, **kwargs),
    "fgsm-rs": lambda **kwargs: FastAdversarialModule(tiny_cnn(), 3, epsilon=0.1, **kwargs),
    "fgsm-previous": lambda **kwargs: FastAdversarialModule(tiny_cnn(), 3, epsilon=0.1, init="previous", **kwargs),
}


def test_clipping_bounds_the_gradient_of_the_step_as_a_hand_computation_does():
    bound = 1e-3
    module = NaturalModule(tiny_cnn(), 3, gradient_clip_norm=bound, optimizer=lambda p: RecordingSGD(p, lr=1.0))
    reference = copy.deepcopy(module.model)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, train_dataloaders=tiny_loader())
    x, y = next(iter(tiny_loader()))
    F.cross_entropy(reference(x), y).backward()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in reference.parameters()]))
    assert norm > 100 * bound, "the bound is active"
    for clipped, weight in zip(module.model.parameters(), reference.parameters()):
        # torch.nn.utils.clip_grad_norm_ scales by bound / (norm + 1e-6).
        torch.testing.assert_close(clipped, weight - weight.grad * bound / (norm + 1e-6), rtol=0, atol=1e-7)
    assert trainer.optimizers[0].norms == pytest.approx([bound], rel=1e-3)


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_every_optimizer_step_is_clipped_and_delta_is_not(make):
    module = make(gradient_clip_norm=1e-3, optimizer=lambda p: RecordingSGD(p))
    trainer = quiet_trainer()
    trainer.fit(module, train_dataloaders=tiny_loader())
    norms = trainer.optimizers[0].norms
    assert len(norms) == trainer.global_step == 3 * getattr(module, "replays", 1)
    assert norms == pytest.approx([1e-3] * len(norms), rel=1e-3)
    if isinstance(module, FreeAdversarialModule):
        assert module.delta.abs().max() == pytest.approx(0.1), "δ takes full sign steps, unclipped"


def _nan_in_second_batch() -> DataLoader:
    """12 images in batches of 4; the first image of the second batch has a NaN pixel (past the first-batch check)."""
    x, y = tiny_dataset(12).tensors
    x = x.clone()
    x[4, 0, 2, 2] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=4)


class Snapshots(Callback):
    """The weights and δ after every training batch."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.deltas: list[torch.Tensor | None] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in module.parameters()])
        delta = getattr(module, "delta", None)
        self.deltas.append(None if delta is None else delta.clone())


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_a_nonfinite_loss_stops_training_with_where_and_the_fix(make):
    module = make()
    steps = getattr(module, "replays", 1)  # optimizer steps per batch
    trainer = quiet_trainer()
    match = rf"epoch 0, batch_idx 1, trainer.global_step {steps} \(optimizer step 1 of the batch's {steps}\)"
    with pytest.raises(FloatingPointError, match=match + ".*on_nonfinite_loss='skip'"):
        trainer.fit(module, train_dataloaders=_nan_in_second_batch())
    assert trainer.global_step == 2 * steps, "it stops at the end of the batch, before the next"


@pytest.mark.parametrize("make", MODULES.values(), ids=MODULES.keys())
def test_skip_drops_the_steps_and_delta_updates_of_a_nonfinite_loss(make):
    # Plain SGD: a step with a zeroed gradient leaves the weights as they are (momentum or weight decay would not).
    module = make(on_nonfinite_loss="skip", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    steps = getattr(module, "replays", 1)
    snapshots = Snapshots()
    trainer = quiet_trainer(callbacks=[snapshots])
    with pytest.warns(UserWarning, match=f"{steps} optimizer step\\(s\\) of epoch 0 had a non-finite loss"):
        trainer.fit(module, train_dataloaders=_nan_in_second_batch())
    before, during, after = snapshots.weights
    assert all(torch.equal(a, b) for a, b in zip(before, during)), "the steps of the NaN batch are skipped"
    assert not all(torch.equal(a, b) for a, b in zip(during, after)), "the next batch steps again"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if snapshots.deltas[0] is not None:
        assert torch.equal(snapshots.deltas[1], snapshots.deltas[0]), "δ is not updated from a NaN loss"
        assert torch.isfinite(module.delta).all()
    assert trainer.global_step == 3 * steps, "skipped steps still count, so schedules stay in step"
    assert trainer.callback_metrics["train/skipped_steps"] == steps
