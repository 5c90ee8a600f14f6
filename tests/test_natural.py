"""NaturalModule against a plain PyTorch training loop; LR scheduling per optimizer step or per epoch."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from conftest import quiet_trainer, tiny_cnn, tiny_loader
from freeadv_pl import FreeAdversarialModule, NaturalModule


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _schedule(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def test_matches_a_plain_training_loop_and_steps_the_scheduler_per_optimizer_step():
    backbone = tiny_cnn()
    reference = copy.deepcopy(backbone)
    module = NaturalModule(backbone, 3, optimizer=_sgd, lr_scheduler=_schedule)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, train_dataloaders=tiny_loader())

    optimizer = _sgd(reference.parameters())
    scheduler = _schedule(optimizer)
    for _ in range(2):
        for x, y in tiny_loader():
            optimizer.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            optimizer.step()
            scheduler.step()
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.1 * 0.5**3
    for ours, theirs in zip(module.model.backbone.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_epoch_interval_steps_the_scheduler_once_per_epoch():
    lrs = []
    module = FreeAdversarialModule(
        tiny_cnn(), 3, replays=2, optimizer=_sgd, lr_scheduler=_schedule, lr_scheduler_interval="epoch"
    )
    module.on_train_epoch_start = lambda: lrs.append(module.optimizers().param_groups[0]["lr"])
    trainer = quiet_trainer(max_epochs=5)
    trainer.fit(module, train_dataloaders=tiny_loader())
    assert trainer.global_step == 5 * 3 * 2
    # StepLR(step_size=2, gamma=0.5) counted in epochs, whatever the 6 optimizer steps of each epoch.
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_validation_and_test_log_natural_accuracy():
    module = NaturalModule(tiny_cnn(), 3)
    trainer = quiet_trainer()
    trainer.fit(module, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader())
    assert {"val/acc", "val/loss", "train/loss", "train/acc"} <= set(trainer.callback_metrics)
    (result,) = trainer.test(module, dataloaders=tiny_loader())
    assert 0 <= result["test/acc"] <= 1 and result["test/loss"] > 0


def test_training_metrics_are_logged_only_where_the_trainer_writes_them(tmp_path):
    # 10 batches, log_every_n_steps=4: the first batch and the Trainer's writing batches 4 and 8 (1-based) are logged.
    logged_batches = []
    module = NaturalModule(tiny_cnn(), 3)
    original_log = module.log

    def counting_log(name, value, **kwargs):
        if name == "train/loss":
            logged_batches.append(module.trainer.fit_loop.epoch_loop.batch_idx)
        original_log(name, value, **kwargs)

    module.log = counting_log
    logger = CSVLogger(tmp_path)
    quiet_trainer(logger=logger, log_every_n_steps=4).fit(module, tiny_loader(n=40, batch_size=4))
    assert logged_batches == [0, 3, 7]
    header, *rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert header == "epoch,step,train/acc,train/loss"
    assert [row.split(",")[1] for row in rows] == ["3", "7"] and all(row.split(",")[3] for row in rows)
