"""A Lightning user's own script, a plain ``LightningCLI()``, runs the package's configs: the modules take
``num_classes``, ``mean`` and ``std`` from the DataModule at set-up, and checkpoints record them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule

from conftest import quiet_trainer, tiny_cnn, tiny_loader
from dataset_files import write_cifar, write_fashion_mnist
from freeadv_pl import NaturalModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
USER_MAIN = """
import json
import os

from lightning.pytorch.cli import LightningCLI

cli = LightningCLI(save_config_kwargs={"overwrite": True})
model, data = cli.model, cli.datamodule
with open(os.environ["PLAIN_CLI_OUT"], "w") as file:
    json.dump(
        {
            "num_classes": model.num_classes,
            "mean": model.model.mean.flatten().tolist(),
            "std": model.model.std.flatten().tolist(),
            "data": [data.num_classes, list(data.mean), list(data.std)],
            "global_step": cli.trainer.global_step,
        },
        file,
    )
"""


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("fashion_mnist/free.yaml", ["--data.init_args.data_dir", "data"]),  # the generated files, not the package's
        ("cifar10/free_m8.yaml", []),
    ],
)
def test_a_plain_lightning_cli_trains_with_the_datas_classes_and_normalization(config, extra, tmp_path):
    dataset = config.split("/")[0]
    if dataset == "fashion_mnist":
        write_fashion_mnist(tmp_path / "data", n_train=600, n_test=100)
    else:
        write_cifar(tmp_path / "data", num_classes=10)
    (tmp_path / "main.py").write_text(USER_MAIN)
    out = tmp_path / "out.json"
    command = [sys.executable, "main.py", "fit", "--config", str(CONFIGS / config)]
    command += ["--config", str(CONFIGS / dataset / "quick.yaml"), "--trainer.default_root_dir", "run", *extra]
    environment = {**os.environ, "PLAIN_CLI_OUT": str(out)}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FreeAdversarialModule takes num_classes=10, mean=" in result.stdout + result.stderr

    run = json.loads(out.read_text())
    data_classes, data_mean, data_std = run["data"]
    assert run["num_classes"] == data_classes == 10
    assert run["mean"] == pytest.approx(data_mean) and run["std"] == pytest.approx(data_std)
    assert run["global_step"] > 0
    checkpoint = torch.load(next((tmp_path / "run").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["num_classes"], hparams["mean"], hparams["std"]) == (data_classes, data_mean, data_std)
    assert checkpoint["state_dict"]["model.mean"].flatten().tolist() == pytest.approx(data_mean)


class TinyData(LightningDataModule):
    """A DataModule that declares what the package's DataModules declare: classes and normalization."""

    num_classes = 3
    mean = (0.25,)
    std = (0.5,)

    def train_dataloader(self):
        return tiny_loader(n=8)


def test_the_module_takes_what_it_was_not_given_from_the_datamodule_and_checkpoints_rebuild_it(tmp_path):
    module = NaturalModule(tiny_cnn())
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=TinyData())
    assert module.num_classes == 3
    assert module.model.mean.flatten().tolist() == [0.25] and module.model.std.flatten().tolist() == [0.5]
    x = torch.full((1, 1, 6, 6), 0.75)
    assert torch.equal(module(x), module.model.backbone((x - 0.25) / 0.5))  # normalized inside the model
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    loaded = NaturalModule.load_from_checkpoint(path, backbone=tiny_cnn())
    assert loaded.num_classes == 3 and torch.equal(loaded(x), module(x))


def test_a_module_with_its_own_statistics_keeps_them_and_warns_when_the_data_declares_others():
    module = NaturalModule(tiny_cnn(), num_classes=3, mean=[0.0], std=[1.0])  # explicitly unnormalized
    with pytest.warns(UserWarning, match=r"the module's own are used\. Leave mean and std out"):
        quiet_trainer(max_steps=1).fit(module, datamodule=TinyData())
    assert module.model.mean.flatten().tolist() == [0.0]


def test_num_classes_neither_given_nor_declared_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"num_classes is not given and the DataModule declares none: pass num_cl"):
        quiet_trainer(max_steps=1).fit(NaturalModule(tiny_cnn()), tiny_loader())
