"""TrainingTime counts each module's forward/backward passes and optimizer steps, splits training from validation
time and carries its totals across a resume; the channels-last and compile fast paths change nothing but speed."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer, tiny_cnn, tiny_loader
from freeadv_pl import FastAdversarialModule, FreeAdversarialModule, NaturalModule, PGDAdversarialModule, TrainingTime

BATCHES = 3  # tiny_loader(): 10 images in batches of 4, 4, 2


@pytest.mark.parametrize(
    ("make_module", "passes", "steps"),
    [
        (lambda: NaturalModule(tiny_cnn(), num_classes=3), 1, 1),
        (lambda: FreeAdversarialModule(tiny_cnn(), num_classes=3, replays=3, epsilon=0.1), 3, 3),
        (lambda: PGDAdversarialModule(tiny_cnn(), num_classes=3, steps=2, epsilon=0.1, step_size=0.05), 3, 1),
        (lambda: FastAdversarialModule(tiny_cnn(), num_classes=3, epsilon=0.1), 2, 1),
    ],
    ids=["natural", "free-3", "pgd-2", "fgsm-rs"],
)
def test_it_counts_passes_and_optimizer_steps_per_module(make_module, passes, steps, lightning_log):
    callback = TrainingTime()
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(make_module(), tiny_loader(), tiny_loader())
    summary = callback.summary
    assert summary["batches"] == 2 * BATCHES
    assert summary["passes"] == 2 * BATCHES * passes and summary["passes_per_batch"] == passes
    assert summary["optimizer_steps"] == 2 * BATCHES * steps == trainer.global_step
    assert summary["train_minutes"] > 0 and summary["validation_minutes"] > 0
    assert summary["fit_minutes"] >= summary["train_minutes"] + summary["validation_minutes"]
    assert trainer.callback_metrics["time/passes"].item() == 2 * BATCHES * passes
    assert f"{2 * BATCHES * passes} forward/backward passes ({passes} per minibatch)" in lightning_log.text


def test_validation_time_is_not_training_time():
    # A validation loader 50 times longer than the training one: validation must take most of the fit.
    callback = TrainingTime()
    long_validation = DataLoader(tiny_loader(n=2000).dataset, batch_size=1)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(NaturalModule(tiny_cnn(), 3), tiny_loader(), long_validation)
    assert callback.summary["validation_minutes"] > 3 * callback.summary["train_minutes"]


def test_a_resumed_run_reports_the_totals_of_the_whole_run(tmp_path):
    def fit(epochs: int, ckpt_path=None) -> TrainingTime:
        callback = TrainingTime()
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback, checkpoint], enable_checkpointing=True)
        module = FreeAdversarialModule(tiny_cnn(), num_classes=3, replays=2, epsilon=0.1)
        trainer.fit(module, tiny_loader(), ckpt_path=ckpt_path)
        return callback

    first = fit(1)
    resumed = fit(2, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.summary["batches"] == 2 * BATCHES
    assert resumed.summary["optimizer_steps"] == 2 * BATCHES * 2
    assert resumed.summary["train_minutes"] > first.summary["train_minutes"]


def test_channels_last_trains_like_the_default_layout():
    # Three input channels: with one, the two memory formats are the same strides and the test would prove nothing.
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(10, 3, 6, 6, generator=generator), torch.randint(0, 3, (10,), generator=generator))

    def train(channels_last: bool) -> FreeAdversarialModule:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        module = FreeAdversarialModule(backbone, num_classes=3, replays=2, epsilon=0.1, channels_last=channels_last)
        quiet_trainer(max_epochs=2).fit(module, DataLoader(data, batch_size=4))
        return module

    default, channels_last = train(False), train(True)
    conv = channels_last.model.backbone[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(default.state_dict().values(), channels_last.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(default.delta, channels_last.delta, rtol=0, atol=1e-6)


def test_compile_wraps_the_model_without_changing_checkpoint_keys():
    module = FreeAdversarialModule(tiny_cnn(), num_classes=3, replays=2, epsilon=0.1, compile=True)
    keys = list(module.state_dict())
    module.setup("fit")
    module.setup("validate")  # a second set-up must not compile again
    assert module.model._compiled_call_impl is not None
    assert list(module.state_dict()) == keys
    assert module.hparams.compile is True
