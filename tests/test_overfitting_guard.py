"""CatastrophicOverfittingGuard: fires on a collapse of PGD accuracy, restores the best weights, stays quiet otherwise."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from conftest import banded_dataset, quiet_trainer, tiny_cnn
from freeadv_pl import CatastrophicOverfittingGuard, FreeAdversarialModule, NaturalModule

COLLAPSE_EPOCH = 4


class _CollapsingModule(NaturalModule):
    """Natural training that learns the banded task, then at COLLAPSE_EPOCH loses it for good: its logits are
    negated (every confident answer becomes a wrong one) and its learning rate set to 0."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == COLLAPSE_EPOCH:
            with torch.no_grad():
                for parameter in self.model.backbone[-1].parameters():
                    parameter.neg_()
            for group in self.optimizers().param_groups:
                group["lr"] = 0.0


class _Recorder(Callback):
    """Keeps the weights the guard sees at each epoch's check (it runs before the guard)."""

    def __init__(self) -> None:
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({key: value.clone() for key, value in pl_module.state_dict().items()})


def _fit(module, guard, *more_callbacks, epochs=8):
    loader = DataLoader(banded_dataset(1024), batch_size=128, shuffle=False)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[*more_callbacks, guard])
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def _collapsing_module():
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return _CollapsingModule(tiny_cnn(), 3, optimizer=optimizer)


def test_fires_on_a_collapse_stops_and_restores_the_best_weights(lightning_log):
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01, threshold=0.2)
    recorder = _Recorder()
    trainer = _fit(module, guard, recorder)
    assert len(guard.history) == COLLAPSE_EPOCH + 1, "the guard stops the training at the epoch of the collapse"
    assert trainer.current_epoch == COLLAPSE_EPOCH + 1 and trainer.should_stop
    assert guard.fired_epoch == COLLAPSE_EPOCH and guard.best_epoch < COLLAPSE_EPOCH
    assert guard.best_accuracy == max(guard.history) >= 0.7 and guard.history[-1] < guard.best_accuracy - 0.2
    for key, value in recorder.weights[guard.best_epoch].items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    assert trainer.callback_metrics["guard/best_robust_acc"] == pytest.approx(guard.best_accuracy)
    assert trainer.callback_metrics["guard/robust_acc"] == pytest.approx(guard.history[-1])
    assert f"catastrophic overfitting at epoch {COLLAPSE_EPOCH}: PGD-5 accuracy" in lightning_log.text


def test_without_restore_best_the_weights_stay_and_training_still_stops():
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01, restore_best=False)
    trainer = _fit(module, guard)
    assert guard.fired_epoch == COLLAPSE_EPOCH and trainer.current_epoch == COLLAPSE_EPOCH + 1
    loader = DataLoader(banded_dataset(1024), batch_size=1024)
    x, y = next(iter(loader))
    with torch.no_grad():
        accuracy = (module.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy < guard.best_accuracy - 0.2, "the collapsed weights are kept"


def test_a_healthy_run_never_fires():
    module = FreeAdversarialModule(
        tiny_cnn(), 3, replays=2, epsilon=0.01, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    )
    guard = CatastrophicOverfittingGuard(threshold=0.2)
    trainer = _fit(module, guard, epochs=6)
    assert guard.fired_epoch is None and len(guard.history) == 6 and trainer.current_epoch == 6
    assert guard.best_accuracy > 0.6, "the run learns; the guard has something to watch"


def test_the_state_survives_a_checkpoint(tmp_path):
    module = _collapsing_module()
    guard = CatastrophicOverfittingGuard(epsilon=0.01)
    trainer = _fit(module, guard, epochs=2)
    trainer.save_checkpoint(tmp_path / "guard.ckpt")
    restored = CatastrophicOverfittingGuard(epsilon=0.01)
    checkpoint = torch.load(tmp_path / "guard.ckpt", weights_only=True)
    (state,) = (value for key, value in checkpoint["callbacks"].items() if "CatastrophicOverfittingGuard" in key)
    restored.load_state_dict(state)
    assert restored.history == guard.history and restored.best_epoch == guard.best_epoch
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()["best_state"][key], value, rtol=0, atol=0)


def test_a_module_without_epsilon_needs_one():
    with pytest.raises(ValueError, match=r"NaturalModule has no `epsilon`: give CatastrophicOverfittingGuard\(epsilon"):
        _fit(NaturalModule(tiny_cnn(), 3), CatastrophicOverfittingGuard(), epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"threshold": 0}, r"threshold must be a fraction in \(0, 1\]", id="threshold-zero"),
        pytest.param({"threshold": 20}, r"threshold must be a fraction in \(0, 1\] \(0.2 = 20 points", id="percent"),
        pytest.param({"steps": 0}, "steps must be an integer ≥ 1", id="steps"),
        pytest.param({"restarts": 0}, "restarts must be an integer ≥ 1", id="restarts"),
        pytest.param({"num_samples": 0}, "num_samples must be an integer ≥ 1", id="samples"),
        pytest.param({"epsilon": "8/256x"}, "epsilon must be a number in", id="epsilon"),
        pytest.param({"model_mode": "inference"}, "model_mode must be one of", id="mode"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CatastrophicOverfittingGuard(**kwargs)
