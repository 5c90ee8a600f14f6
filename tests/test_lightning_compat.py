"""Each private Lightning API that ``freeadv_pl/_lightning_compat.py`` reads still means what the package needs,
checked against the installed Lightning's own public behaviour (and the CLI parser's subcommand entries)."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, tiny_cnn, tiny_loader
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from freeadv_pl._lightning_compat import (
    cli_class_path,
    cli_subcommand_entries,
    count_optimizer_step,
    epoch_to_run,
    resumes_after_last_batch,
    should_update_logs,
)


class StepsThreeTimesDirectly(LightningModule):
    """Manual optimization: three steps of the wrapped optimizer per batch, each counted with the helper; the batch
    index is logged on the batches where the helper says the Trainer writes logs."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = tiny_cnn()
        self.flags: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(self.net(x), y).backward()
            optimizer.optimizer.step()
            count_optimizer_step(optimizer)
        self.flags.append(should_update_logs(self.trainer))
        self.log("batch", float(batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_count_optimizer_step_advances_global_step_as_lightning_optimizer_step_does(tmp_path):
    module = StepsThreeTimesDirectly()
    trainer = quiet_trainer(max_epochs=2, max_steps=-1)
    trainer.fit(module, tiny_loader(n=12))  # 3 batches per epoch
    assert trainer.global_step == 2 * 3 * 3


def test_should_update_logs_is_true_exactly_on_the_batches_the_logger_writes(tmp_path):
    module = StepsThreeTimesDirectly()
    trainer = quiet_trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    trainer.fit(module, tiny_loader(n=28))  # 7 batches
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as file:
        written = [int(float(row["batch"])) for row in csv.DictReader(file) if row.get("batch")]
    assert written and written == [index for index, flag in enumerate(module.flags) if flag]


def test_cli_class_path_is_the_class_lightning_cli_records_in_the_hyperparameters(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from freeadv_pl import NaturalModule

    config = {
        "model": {
            "class_path": "freeadv_pl.NaturalModule",
            "init_args": {"backbone": {"class_path": "freeadv_pl.SmallCNN"}, "num_classes": 10},
        }
    }
    cli = LightningCLI(args=config, run=False, trainer_defaults={"logger": False})
    assert isinstance(cli.model, NaturalModule)
    assert cli_class_path(cli.model.hparams) == "freeadv_pl.NaturalModule"
    assert cli_class_path(NaturalModule(torch.nn.Linear(2, 10), num_classes=10).hparams) is None


class RecordsEpochs(LightningModule):
    """Automatic optimization on a tiny net; records each fit's first (epoch, batch_idx), the epochs whose end ran, and
    what ``epoch_to_run`` says when the training loader is built."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()
        self.first: tuple[int, int] | None = None
        self.ended: list[int] = []
        self.to_run: tuple[int, bool] | None = None

    def training_step(self, batch, batch_idx):
        if self.first is None:
            self.first = (self.current_epoch, batch_idx)
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def on_train_epoch_end(self):
        self.ended.append(self.current_epoch)

    def train_dataloader(self):
        self.to_run = epoch_to_run(self.trainer)
        return tiny_loader(n=12)  # 3 batches per epoch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_resumes_after_last_batch_is_lightnings_own_reading_of_a_checkpoint(tmp_path):
    steps = ModelCheckpoint(tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    epochs = ModelCheckpoint(tmp_path / "epochs", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    first = RecordsEpochs()
    quiet_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[steps, epochs]).fit(first)
    assert first.to_run == (0, False)
    loops = {path.stem: torch.load(path, weights_only=True)["loops"]["fit_loop"] for path in tmp_path.rglob("*.ckpt")}
    after_last = {name for name, loop in loops.items() if resumes_after_last_batch(loop)}
    assert after_last == {"step=3", "step=6"}  # the last batch of each epoch, not the epoch ends "epoch=0", "epoch=1"

    for checkpoint, expected_start, expected_to_run in [
        ("steps/step=3.ckpt", (1, 0), (1, True)),  # Lightning starts epoch 1 and skips epoch 0's end
        ("steps/step=2.ckpt", (0, 2), (0, False)),  # mid-epoch: the rest of epoch 0
        ("epochs/epoch=0.ckpt", (1, 0), (1, False)),  # after epoch 0's end
    ]:
        resumed = RecordsEpochs()
        quiet_trainer(max_epochs=2, enable_checkpointing=False).fit(resumed, ckpt_path=tmp_path / checkpoint)
        assert resumed.first == expected_start and resumed.to_run == expected_to_run, checkpoint
        assert resumed.ended == [1] if expected_start[0] == 1 else resumed.ended == [0, 1]



class _ParserBuilt(Exception):
    """Stops a LightningCLI once its parser is built, carrying the parser."""


def test_cli_subcommand_entries_are_the_help_entries_of_lightning_cli_subcommands():
    class StopAfterParser(LightningCLI):
        def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs):
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            raise _ParserBuilt(self.parser)

    with pytest.raises(_ParserBuilt) as built:
        StopAfterParser(LightningModule, args=["fit"], run=True)
    action, entries = cli_subcommand_entries(built.value.args[0])
    assert {"fit", "validate", "test", "predict"} <= {entry.dest for entry in entries}
    assert all(hasattr(entry, "help") for entry in entries) and callable(action.add_subcommand)
    with pytest.raises(_ParserBuilt) as built:
        StopAfterParser(LightningModule, args=[], run=False)
    assert cli_subcommand_entries(built.value.args[0]) is None, "no subcommands without run=True"
