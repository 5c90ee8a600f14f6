"""Resuming with ``ckpt_path``: a run stopped at an epoch boundary ends exactly where the uninterrupted run ends
(weights, optimizer state, LR schedule, δ); a mid-epoch checkpoint resumes with its own state; δ from older
checkpoints and other world sizes; every checkpoint loads with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import quiet_trainer, tiny_cnn, tiny_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from freeadv_pl import (
    AdversarialExamplesLogger,
    CatastrophicOverfittingGuard,
    FastAdversarialModule,
    FreeAdversarialModule,
    RobustEvaluation,
    TrainingTime,
)
from freeadv_pl.modules._perturbation import CHECKPOINT_KEY, StoredPerturbation

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using ModelCheckpoint with manual optimization:UserWarning",  # our state is consistent at batch end
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",
)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _schedule(optimizer):
    # Milestones in optimizer steps: one before the interruption (after epoch 0: step 6 for Free-2, 3 for FGSM), one
    # after it, so that a scheduler restarted from scratch would show.
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 7], gamma=0.5)


def _free(seed: int) -> FreeAdversarialModule:
    return FreeAdversarialModule(
        tiny_cnn(seed=seed), 3, replays=2, epsilon=0.1, step_size=0.03, optimizer=_sgd, lr_scheduler=_schedule
    )


def _fast_previous(seed: int) -> FastAdversarialModule:
    return FastAdversarialModule(
        tiny_cnn(seed=seed), 3, epsilon=0.1, step_size=0.03, init="previous", optimizer=_sgd, lr_scheduler=_schedule
    )


def _fit(module, epochs: int, ckpt_path=None, callbacks=()):
    saves = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=saves, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=tiny_loader(), ckpt_path=ckpt_path)  # batches of 4, 4 and 2, in order
    return trainer


def _max_gap(first: dict, second: dict) -> float:
    """The largest absolute difference between the tensors of two state dictionaries of the same layout."""
    assert first.keys() == second.keys()
    gaps = [
        _max_gap(a, b) if isinstance(a, dict) else (a - b).abs().max().item()
        for a, b in ((first[key], second[key]) for key in first)
        if isinstance(a, (dict, torch.Tensor))
    ]
    return max(gaps, default=0.0)


@pytest.mark.parametrize("make", [pytest.param(_free, id="free-m2"), pytest.param(_fast_previous, id="fgsm-previous")])
def test_resuming_at_an_epoch_boundary_ends_where_the_uninterrupted_run_ends(make, tmp_path):
    whole = make(seed=0)
    whole_trainer = _fit(whole, epochs=3)
    _fit(make(seed=0), epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    resumed = make(seed=1)  # other initial weights: all state must come from the checkpoint
    resumed_trainer = _fit(resumed, epochs=3, ckpt_path=tmp_path / "last.ckpt")

    assert resumed_trainer.global_step == whole_trainer.global_step
    whole_optimizer, resumed_optimizer = whole_trainer.optimizers[0], resumed_trainer.optimizers[0]
    gaps = {
        "weights": _max_gap(whole.state_dict(), resumed.state_dict()),
        "optimizer": _max_gap(whole_optimizer.state_dict()["state"], resumed_optimizer.state_dict()["state"]),
        "lr": abs(whole_optimizer.param_groups[0]["lr"] - resumed_optimizer.param_groups[0]["lr"]),
        "delta": (whole.delta - resumed.delta).abs().max().item(),
    }
    print(f"max |resumed - uninterrupted|: {gaps}")  # the figures of the README (pytest -s)
    assert max(gaps.values()) <= 1e-6, gaps
    whole_schedule = whole_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert resumed_trainer.lr_scheduler_configs[0].scheduler.state_dict() == whole_schedule
    assert whole_optimizer.param_groups[0]["lr"] == pytest.approx(0.025), "both milestones passed"
    assert resumed.delta.abs().max() > 0


class _StateAtBatchEnd(Callback):
    """δ, weights and LR after every training batch (on_train_batch_end, where ModelCheckpoint saves)."""

    def __init__(self) -> None:
        self.deltas, self.weights, self.lrs = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.deltas.append(module.delta.clone())
        self.weights.append({key: value.clone() for key, value in module.state_dict().items()})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class _Restored(Callback):
    """δ and LR when training starts (after the checkpoint is restored), and each batch's first pixel sum."""

    def __init__(self) -> None:
        self.delta, self.lr, self.batches = None, None, []

    def on_train_start(self, trainer, module):
        self.delta, self.lr = module.delta.clone(), trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx, batch[0].sum().item()))


def test_a_mid_epoch_checkpoint_resumes_with_its_state_and_finishes(tmp_path):
    at_batch_end = _StateAtBatchEnd()
    # every_n_train_steps counts optimizer steps: with m = 2, a checkpoint after every batch.
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit(_free(seed=0), epochs=1, callbacks=[at_batch_end, saver])
    path = tmp_path / "step=2.ckpt"  # after the first of epoch 0's three batches
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved[CHECKPOINT_KEY]["per_rank"][0], at_batch_end.deltas[0])
    assert _max_gap(saved["state_dict"], at_batch_end.weights[0]) == 0

    restored = _Restored()
    resumed = _free(seed=1)
    trainer = _fit(resumed, epochs=2, ckpt_path=path, callbacks=[restored])
    assert torch.equal(restored.delta, at_batch_end.deltas[0])
    assert restored.lr == at_batch_end.lrs[0] == 0.05
    assert trainer.global_step == 2 * 3 * 2, "the epochs end where they would have ended"
    assert resumed.delta.abs().max() > 0
    # Lightning re-enters epoch 0 at batch_idx 1, but a plain DataLoader starts its iterator again: the rest of
    # epoch 0 gets the loader's first two batches (batch 0 a second time), not batches 1 and 2 (README, "Resuming").
    batch_sums = [x.sum().item() for x, _ in tiny_loader()]
    assert restored.batches[:2] == [(0, 1, batch_sums[0]), (0, 2, batch_sums[1])]
    assert restored.batches[2:] == [(1, index, batch_sum) for index, batch_sum in enumerate(batch_sums)]


def _trainer_of(rank: int, world_size: int, fn: TrainerFn = TrainerFn.FITTING) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world_size, state=SimpleNamespace(fn=fn))


def test_a_single_tensor_checkpoint_is_the_delta_of_a_one_process_run():
    old = {CHECKPOINT_KEY: torch.full((2, 1, 6, 6), 0.1)}  # written before δ was saved per process
    delta = StoredPerturbation()
    delta.load(old, _trainer_of(0, 1))
    assert torch.equal(delta.tensor, old[CHECKPOINT_KEY])
    with pytest.warns(UserWarning, match=r"δ_r of 1 process\(es\) but this run has 2: .*starts from δ = 0 for r ≥ 1"):
        delta.load(old, _trainer_of(1, 2))
    assert delta.tensor is None


def test_a_checkpoint_of_another_world_size_gives_each_process_its_own_delta_where_it_exists():
    per_rank = [torch.full((2, 1, 6, 6), 0.1), torch.full((3, 1, 6, 6), -0.1), None]
    checkpoint = {CHECKPOINT_KEY: {"world_size": 3, "per_rank": per_rank}}
    delta = StoredPerturbation()
    for rank, expected in enumerate(per_rank[:2]):
        with pytest.warns(UserWarning, match=r"δ_r of 3 process\(es\) but this run has 2: .*δ_r for r ≥ 2 is not"):
            delta.load(checkpoint, _trainer_of(rank, 2))
        assert torch.equal(delta.tensor, expected)
    delta.load(checkpoint, _trainer_of(2, 3))
    assert delta.tensor is None, "a process that had no δ yet when saved starts from zeros again"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # outside fit δ is not used: no warning
        delta.load(checkpoint, None)  # load_from_checkpoint: rank 0's δ
        assert torch.equal(delta.tensor, per_rank[0])
        delta.load(checkpoint, _trainer_of(1, 2, TrainerFn.TESTING))  # trainer.test(ckpt_path=...)
        assert torch.equal(delta.tensor, per_rank[1])


def test_every_checkpoint_loads_with_weights_only(tmp_path):
    callbacks = [
        RobustEvaluation(num_samples=4, batch_size=4),
        CatastrophicOverfittingGuard(threshold=1.0, num_samples=4),
        TrainingTime(),
        AdversarialExamplesLogger(num_images=2),
        ModelCheckpoint(dirpath=tmp_path, save_last=True),
    ]
    module = _free(seed=0)
    trainer = quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(module, tiny_loader(), tiny_loader())
    files = sorted(tmp_path.glob("*.ckpt"))
    assert len(files) == 2
    for path in files:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["hyper_parameters"]["replays"] == 2
        assert checkpoint[CHECKPOINT_KEY]["world_size"] == 1
        assert len(checkpoint["callbacks"]) == len(callbacks)
        assert checkpoint["lr_schedulers"] and checkpoint["optimizer_states"]
    restored = FreeAdversarialModule.load_from_checkpoint(
        tmp_path / "last.ckpt", backbone=tiny_cnn(), weights_only=True
    )
    assert torch.equal(restored.delta, module.delta)
