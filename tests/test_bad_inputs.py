"""The table of bad inputs: each gives an error of a known type whose message names the argument and the fix, and
leaves nothing half-written in the run's folder (the README's Troubleshooting section is drawn from it)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_cnn, tiny_dataset, tiny_loader
from dataset_files import write_fashion_mnist, write_image_folder, write_png_folder
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from freeadv_pl import (
    AttackSpec,
    AutoAttackSpec,
    CIFAR10DataModule,
    FashionMNISTDataModule,
    FreeAdversarialModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    NaturalModule,
    PGDAdversarialModule,
    PriorGuidedFGSMModule,
    RobustEvaluation,
    SmallCNN,
)
from freeadv_pl.cli import build_cli
from freeadv_pl.evaluate_command import evaluate_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist"


@dataclass
class Run:
    """Where a case reads its prepared inputs (``inputs``) and where the run may write (``out``, also the working
    directory)."""

    inputs: Path
    out: Path

    def trainer(self, **kwargs) -> Trainer:
        """A CPU Trainer with everything that writes to disk left on: a logger and checkpoints under ``out``."""
        settings = {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "num_sanity_val_steps": 0}
        return Trainer(default_root_dir=self.out, enable_model_summary=False, **{**settings, **kwargs})

    def fashion_mnist(self) -> Path:
        """Fashion-MNIST files in the real format (10 classes)."""
        folder = self.inputs / "fashion_mnist"
        write_fashion_mnist(folder, n_train=120, n_test=20)
        return folder

    def cli(self, *args: str, config: str = "free.yaml", out: Path | None = None) -> None:
        """``freeadv_pl fit`` of a Fashion-MNIST config with its quick overlay, on generated files."""
        build_cli(
            ["fit", "--config", str(CONFIGS / config), "--config", str(CONFIGS / "quick.yaml")]
            + ["--data.init_args.data_dir", str(self.fashion_mnist()), "--data.init_args.train_size", "64"]
            + ["--data.init_args.val_size", "16", "--trainer.default_root_dir", str(out or self.out), *args]
        )

    def natural_cli_checkpoint(self) -> Path:
        """The last checkpoint of a ``freeadv_pl fit`` run of the natural Fashion-MNIST config."""
        self.cli(config="natural.yaml", out=self.inputs / "natural")
        return self.inputs / "natural" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    def natural_checkpoint(self) -> Path:
        """A checkpoint of a NaturalModule trained from Python (not by the CLI)."""
        module = NaturalModule(SmallCNN(in_channels=1, num_classes=10), 10)
        trainer = Trainer(default_root_dir=self.inputs, logger=False, max_steps=1, enable_progress_bar=False)
        data = FashionMNISTDataModule(self.fashion_mnist(), batch_size=16, val_size=0)
        trainer.fit(module, datamodule=data)
        trainer.save_checkpoint(self.inputs / "natural.ckpt")
        return self.inputs / "natural.ckpt"


def _fit(run: Run, module, loader: DataLoader | None = None, **trainer_kwargs) -> None:
    run.trainer(**trainer_kwargs).fit(module, train_dataloaders=loader or tiny_loader())


def _free(**kwargs) -> FreeAdversarialModule:
    return FreeAdversarialModule(tiny_cnn(), 3, **kwargs)


def _images_with(value: float, index: int = 0) -> DataLoader:
    """The tiny data set (batches of 4) with one pixel of image ``index`` set to ``value``."""
    x, y = tiny_dataset(12).tensors
    x = x.clone()
    x[index, 0, 0, 0] = value
    return DataLoader(TensorDataset(x, y), batch_size=4)


class _ClaimsToBeHuge(TensorDataset):
    """Twelve real indexed examples whose length claims 10^12: a δ bank of 144 TB."""

    def __init__(self) -> None:
        x, y = tiny_dataset(12).tensors
        super().__init__(x, y, torch.arange(12))

    def __len__(self) -> int:
        return 10**12


def _normalized_images() -> DataLoader:
    x, y = tiny_dataset().tensors
    return DataLoader(TensorDataset((x - 0.5) / 0.25, y), batch_size=4)


def _ten_class_labels() -> DataLoader:
    x, _ = tiny_dataset(12).tensors
    return DataLoader(TensorDataset(x, 9 - torch.arange(12) % 10), batch_size=4)  # the first batch: 9, 8, 7, 6


def _mismatched_imagenet(run: Run) -> None:
    root = run.inputs / "imagenet"
    write_image_folder(root, ["n01", "n02", "n03"], per_class=1, splits=("train",))
    write_image_folder(root, ["n01", "n02", "n04"], per_class=1, splits=("val",))
    module = NaturalModule(tiny_cnn(), 3)
    run.trainer().fit(module, datamodule=ImageNetDataModule(root, num_classes=3, image_size=32, resize_size=32))


def _unknown_yaml_key(run: Run) -> None:
    config = run.inputs / "typo.yaml"
    config.write_text("model:\n  init_args:\n    replay: 8\n")
    run.cli("--config", str(config))


def _fit_image_folder(run: Run, write: Callable[[Path], object] | None = None) -> None:
    """Fit on the folder ``run.inputs / "images"`` after ``write`` has put images in it (None: it stays empty)."""
    root = run.inputs / "images"
    root.mkdir()
    if write is not None:
        write(root)
    run.trainer().fit(NaturalModule(tiny_cnn(), 3), datamodule=ImageFolderDataModule(root))


def _sizes_differ(root: Path) -> None:
    write_png_folder(root, ["cat", "dog", "fox"], per_class=2, size=(16, 16), splits=("train", "val"))
    Image.new("RGB", (20, 16)).save(root / "train" / "dog" / "wide.png")


def _evaluate(run: Run, model: str, *args: str) -> None:
    """``freeadv_pl evaluate`` of ``model`` on generated Fashion-MNIST files (PGD-5 on 4 test images), with the
    modules that ``run.inputs`` holds importable meanwhile."""
    sys.path.insert(0, str(run.inputs))
    try:
        evaluate_command(
            ["--model", model, "--data.class_path", "freeadv_pl.FashionMNISTDataModule"]
            + ["--data.init_args.data_dir", str(run.fashion_mnist()), "--attacks", "pgd5", "--epsilon", "0.1"]
            + ["--num_samples", "4", "--progress_bar", "false", "--device", "cpu", *args]
        )
    finally:
        sys.path.remove(str(run.inputs))


def _models_module(run: Run, name: str) -> str:
    """A user's module in ``run.inputs`` whose ``net()`` is a 5-class model of Fashion-MNIST's images; its name."""
    (run.inputs / f"{name}.py").write_text(
        "from torch import nn\n\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))\n"
    )
    sys.modules.pop(name, None)  # another case's module of the same name
    return name


def _weights_only_file(run: Run) -> str:
    """A ``.ckpt`` that holds a dict of tensors, not a classifier's checkpoint."""
    path = run.inputs / "weights.ckpt"
    torch.save({"weights": torch.zeros(2)}, path)
    return str(path)


def _without(package: str, action: Callable[[], object]) -> object:
    """``action()`` as if ``package`` were not installed."""
    real = importlib.util.find_spec
    with mock.patch.object(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)):
        return action()


NOTHING, NO_CHECKPOINT = "nothing", "no checkpoint"
"""What a failed run may leave in its folder: no file at all, or no checkpoint (a logger's folder, the CLI's
config.yaml, written before the error was found, may remain; no checkpoint that looks like a result)."""


@dataclass
class Case:
    action: Callable[[Run], object]
    error: type[BaseException]
    fragments: tuple[str, ...]
    leaves: str = NOTHING


CASES = {
    "replays<1": Case(lambda run: _free(replays=0), ValueError, ("replays must be an integer ≥ 1", "got 0")),
    "replays-not-integer": Case(
        lambda run: _free(replays=2.5), TypeError, ("replays must be an integer ≥ 1", "got 2.5 (float)")
    ),
    "epsilon<0": Case(lambda run: _free(epsilon=-0.1), ValueError, ("epsilon must lie in [0, 1]", "got -0.1")),
    "epsilon>1": Case(
        lambda run: _free(epsilon=8), ValueError, ("epsilon must lie in [0, 1]", "pixel units", "8/255", "got 8")
    ),
    "epsilon-typo": Case(
        lambda run: _free(epsilon="8/256x"), ValueError, ("epsilon must be a number in [0, 1]", "'8/255', got '8/256x'")
    ),
    "step_size<=0": Case(lambda run: _free(step_size=0), ValueError, ("step_size must lie in (0, 1]", "got 0")),
    "delta_memory": Case(
        lambda run: _free(delta_memory="image"), ValueError, ("delta_memory must be one of 'batch', 'example'",)
    ),
    "delta_start_noise>1": Case(
        lambda run: _free(delta_start_noise=2), ValueError, ("delta_start_noise must lie in [0, 1]", "got 2")
    ),
    "delta_reset_every<1": Case(
        lambda run: _free(delta_reset_every=0), ValueError, ("delta_reset_every must be an integer ≥ 1", "got 0")
    ),
    "example-memory-without-index": Case(
        lambda run: _fit(run, _free(delta_memory="example")),
        ValueError,
        ("needs training batches (x, y, index)", "got (x, y)", "return_index=True"),
        NO_CHECKPOINT,
    ),
    "delta-bank-does-not-fit": Case(
        lambda run: _fit(
            run, _free(delta_memory="example"), DataLoader(_ClaimsToBeHuge(), batch_size=4, sampler=range(12))
        ),
        ValueError,
        ("needs a δ bank of", "GiB per process but the available host memory", "delta_bank='cpu'", "train_size"),
        NO_CHECKPOINT,
    ),
    "imagenet-index-with-augment": Case(
        lambda run: ImageNetDataModule(run.inputs, return_index=True),
        ValueError,
        ("return_index=True with augment=True is not supported for ImageNet", "Set augment=False"),
    ),
    "attack-loss": Case(
        lambda run: AttackSpec(steps=20, loss="l2"), ValueError, ("loss must be one of 'ce', 'cw'", "got 'l2'")
    ),
    "attack-preset": Case(
        lambda run: RobustEvaluation(attacks="pgd7"),
        ValueError,
        ("attacks='pgd7' is not a preset", "use one of cifar, imagenet, pgd20"),
    ),
    "restarts<1": Case(
        lambda run: AttackSpec(steps=20, restarts=0), ValueError, ("restarts must be an integer ≥ 1", "got 0")
    ),
    "attack-norm": Case(
        lambda run: AttackSpec(steps=20, norm="l1"), ValueError, ("norm must be one of 'linf', 'l2'", "got 'l1'")
    ),
    "autoattack-norm": Case(
        lambda run: AutoAttackSpec(norm="Linf"), ValueError, ("norm must be one of 'linf', 'l2'", "got 'Linf'")
    ),
    "evaluation-norm": Case(
        lambda run: RobustEvaluation(norm="l3"), ValueError, ("norm must be one of 'linf', 'l2'", "got 'l3'")
    ),
    "l2-epsilon<0": Case(
        lambda run: AttackSpec(norm="l2", epsilon=-0.5),
        ValueError,
        ("epsilon must be a finite number ≥ 0", "an L2 radius in pixel units", "0.5 is CIFAR-10's usual", "got -0.5"),
    ),
    "l2-epsilon-inf": Case(
        lambda run: RobustEvaluation(norm="l2", epsilon=float("inf")),
        ValueError,
        ("epsilon must be a finite number ≥ 0", "got inf"),
    ),
    "l2-epsilon-nan": Case(
        lambda run: AutoAttackSpec(norm="l2", epsilon=float("nan")),
        ValueError,
        ("epsilon must be a finite number ≥ 0", "got nan"),
    ),
    "evaluation-epsilon-before-the-norm": Case(
        lambda run: RobustEvaluation(epsilon=-1),
        ValueError,
        ("epsilon must lie in [0, 1]", "(L∞, the default norm); with norm='l2': epsilon must be a finite number ≥ 0"),
    ),
    "evaluation-epsilon-vs-the-modules-norm": Case(
        lambda run: run.trainer(callbacks=[RobustEvaluation(epsilon=1.5)]).validate(
            NaturalModule(tiny_cnn(), 3), tiny_loader(), verbose=False
        ),
        ValueError,
        ("RobustEvaluation(epsilon=1.5) does not fit the threat model", "got 1.5 (PGD-20 runs in L∞)")
        + ("NaturalModule has no norm", "e.g. RobustEvaluation(norm='l2')"),
    ),
    "evaluation-attack-without-the-protocol": Case(
        lambda run: RobustEvaluation([AttackSpec(steps=0), torch.nn.Identity()]),
        TypeError,
        ("attacks[1] (Identity) is no attack of a suite", "it lacks key, title, epsilon, describe, resolved")
        + ("freeadv_pl.EvaluationAttack",),
    ),
    "evaluation-preset-in-a-list": Case(
        lambda run: RobustEvaluation(["pgd20"]),
        TypeError,
        ("attacks[0] is the string 'pgd20'", "a preset's name is given alone (attacks='pgd20')"),
    ),
    "module-norm": Case(lambda run: _free(norm="l1"), ValueError, ("norm must be one of 'linf', 'l2'", "got 'l1'")),
    "module-loss": Case(lambda run: _free(loss="mse"), ValueError, ("loss must be one of 'ce', 'trades'", "got 'mse'")),
    "module-l2-epsilon<0": Case(
        lambda run: _free(norm="l2", epsilon=-1.0), ValueError, ("epsilon must be a finite number ≥ 0", "got -1.0")
    ),
    "module-l2-epsilon-inf": Case(
        lambda run: PGDAdversarialModule(tiny_cnn(), 3, norm="l2", epsilon=float("inf")),
        ValueError,
        ("epsilon must be a finite number ≥ 0", "3.0 ImageNet's", "got inf"),
    ),
    "trades_beta<0": Case(
        lambda run: _free(loss="trades", trades_beta=-1.0),
        ValueError,
        ("trades_beta must be a finite number ≥ 0, got -1.0", "the authors' 6.0"),
    ),
    "loss-on-natural": Case(
        lambda run: NaturalModule(tiny_cnn(), 3, loss="trades"),
        ValueError,
        ("NaturalModule does not take loss='trades'", "options of FreeAdversarialModule", "loss='trades'"),
    ),
    "norm-on-mep": Case(
        lambda run: PriorGuidedFGSMModule(tiny_cnn(), 3, norm="l2"),
        ValueError,
        ("PriorGuidedFGSMModule does not take norm='l2'", "L∞ threat model only", "norm='l2'"),
    ),
    "gradient_clip_norm<=0": Case(
        lambda run: _free(gradient_clip_norm=0.0), ValueError, ("gradient_clip_norm must be a finite number > 0",)
    ),
    "on_nonfinite_loss": Case(
        lambda run: _free(on_nonfinite_loss="ignore"),
        ValueError,
        ("on_nonfinite_loss must be one of 'raise', 'skip'", "got 'ignore'"),
    ),
    "accumulate_grad_batches": Case(
        lambda run: _fit(run, _free(replays=2), accumulate_grad_batches=2),
        MisconfigurationException,
        ("Remove `Trainer(accumulate_grad_batches=2)`",),
    ),
    "accumulate_grad_batches-cli": Case(
        lambda run: run.cli("--trainer.accumulate_grad_batches=2"),
        ValueError,
        ("accumulate_grad_batches=2 is not supported", "manual optimization", "raise data.batch_size"),
    ),
    "gradient_clip_val": Case(
        lambda run: _fit(run, _free(replays=2), gradient_clip_val=1.0),
        MisconfigurationException,
        ("Remove `Trainer(gradient_clip_val=1.0)`",),
    ),
    "gradient_clip_val-cli": Case(
        lambda run: run.cli("--trainer.gradient_clip_val=1.0"),
        ValueError,
        ("gradient_clip_val=1.0 is not supported", "Remove gradient_clip_val", "gradient_clip_norm=1.0"),
    ),
    "data-outside-[0,1]": Case(
        lambda run: _fit(run, NaturalModule(tiny_cnn(), 3), _normalized_images()),
        ValueError,
        ("must be in [0, 1] pixel space", "Remove any Normalize transform", "pass mean/std to the module"),
        NO_CHECKPOINT,
    ),
    "nan-pixel-first-batch": Case(
        lambda run: _fit(run, NaturalModule(tiny_cnn(), 3), _images_with(float("nan"))),
        ValueError,
        ("first training batch holds NaN pixels",),
        NO_CHECKPOINT,
    ),
    "nan-loss-later-batch": Case(
        lambda run: _fit(run, _free(replays=2), _images_with(float("nan"), index=5)),
        FloatingPointError,
        ("loss is not finite", "epoch 0, batch_idx 1", "trainer.global_step 2", "on_nonfinite_loss='skip'"),
        NO_CHECKPOINT,
    ),
    "fashion-mnist-path": Case(
        lambda run: run.trainer().fit(
            NaturalModule(tiny_cnn(), 10), datamodule=FashionMNISTDataModule(run.inputs / "no")
        ),
        FileNotFoundError,
        ("Fashion-MNIST training files", "not found in", "dataset-fashion-mnist", "download=True", "set data_dir"),
    ),
    "cifar-path": Case(
        lambda run: run.trainer().fit(NaturalModule(tiny_cnn(), 10), datamodule=CIFAR10DataModule(run.inputs / "no")),
        FileNotFoundError,
        ("CIFAR-10 not found", "cifar-10-batches-py", "download=True", "set data_dir"),
    ),
    "imagenet-path": Case(
        lambda run: run.trainer().fit(NaturalModule(tiny_cnn(), 3), datamodule=ImageNetDataModule(run.inputs / "no")),
        FileNotFoundError,
        ("ImageNet folder", "does not exist", "set data_dir"),
    ),
    "imagenet-classes-differ": Case(
        _mismatched_imagenet,
        ValueError,
        ("do not match", "only in val/: n04", "missing from val/: n03", "Both splits need the same class folders"),
    ),
    "num_classes-vs-datamodule": Case(
        lambda run: run.trainer().fit(
            NaturalModule(tiny_cnn(5), 5), datamodule=FashionMNISTDataModule(run.fashion_mnist(), val_size=0)
        ),
        ValueError,
        ("DataModule has num_classes=10", "module has num_classes=5", "pass num_classes=10"),
    ),
    "num_classes-vs-labels": Case(
        lambda run: _fit(run, NaturalModule(tiny_cnn(5), 5), _ten_class_labels()),
        ValueError,
        ("labels in [6, 9] but num_classes=5", "set num_classes to the data's number of classes"),
        NO_CHECKPOINT,
    ),
    "checkpoint-of-another-module": Case(
        lambda run: FreeAdversarialModule.load_from_checkpoint(run.natural_checkpoint(), backbone=SmallCNN()),
        ValueError,
        ("written by freeadv_pl.modules.natural.NaturalModule", "not by freeadv_pl.modules.free.FreeAdversarial"),
    ),
    "checkpoint-of-another-module-cli": Case(
        lambda run: run.cli("--ckpt_path", str(run.natural_cli_checkpoint())),
        ValueError,
        ("written by a freeadv_pl.NaturalModule run", "the config's model is freeadv_pl.FreeAdversarialModule")
        + ("Pass the config of the run that wrote it",),
    ),
    "checkpoint-not-from-the-cli": Case(
        lambda run: run.cli("--ckpt_path", str(run.natural_checkpoint())),
        ValueError,
        ("was not written by the freeadv_pl command line", "Resume or test it from Python"),
    ),
    "image-folder-empty": Case(
        lambda run: _fit_image_folder(run),
        FileNotFoundError,
        ("images/train does not exist", "data_dir must hold train/", "one folder per class"),
    ),
    "image-folder-one-class": Case(
        lambda run: _fit_image_folder(run, lambda root: write_png_folder(root, ["cat"], per_class=3)),
        ValueError,
        ("holds a single class folder (cat)", "at least 2 classes", "Add a folder of images for each class"),
    ),
    "image-folder-sizes-differ": Case(
        lambda run: _fit_image_folder(run, _sizes_differ),
        ValueError,
        ("the images differ in size", "wide.png is 20×16", "image_size=None", "set image_size=..."),
    ),
    "evaluate-unknown-model-name": Case(
        lambda run: _evaluate(run, "torchvision:resnet999"),
        ValueError,
        ("unknown model name 'resnet999'", "torchvision.models.list_models() lists them all"),
    ),
    "evaluate-model-of-no-form": Case(
        lambda run: _evaluate(run, "resnet18"),
        ValueError,
        ("--model 'resnet18' is no file and no model name", "Did you mean torchvision:resnet18"),
    ),
    "evaluate-module-not-importable": Case(
        lambda run: _evaluate(run, "no_such_models:net"),
        ImportError,
        ("no module named 'no_such_models' can be imported", "on PYTHONPATH or run from it"),
    ),
    "evaluate-function-not-in-module": Case(
        lambda run: _evaluate(run, f"{_models_module(run, 'my_models_typo')}:nett"),
        ImportError,
        ("has no 'nett'", "Did you mean my_models_typo:net?"),
    ),
    "evaluate-checkpoint-not-a-classifier": Case(
        lambda run: _evaluate(run, _weights_only_file(run)),
        ValueError,
        ("is no classifier checkpoint: it holds a dict with keys weights", "--model package.module:function"),
    ),
    "evaluate-outputs-vs-classes": Case(
        lambda run: _evaluate(run, f"{_models_module(run, 'my_models_head')}:net"),
        ValueError,
        ("gives 5 logits per image but FashionMNISTDataModule has num_classes=10", "pass a model with 10 outputs"),
    ),
    "evaluate-attack-name": Case(
        lambda run: _evaluate(run, "no_such_models:net", "--attacks", "pgd"),
        ValueError,
        ("--attacks: 'pgd' is neither a preset", "pgd20, cw20, pgd20x10"),
    ),
    "checkpoint-without-backbone": Case(
        lambda run: NaturalModule.load_from_checkpoint(run.natural_checkpoint()),
        ValueError,
        ("records no backbone configuration", "load_from_checkpoint(path, backbone=", "freeadv_pl evaluate --model"),
    ),
    "autoattack-implementation": Case(
        lambda run: AutoAttackSpec(implementation="pyautoattack"),
        ValueError,
        ("implementation must be 'official' (Croce & Hein's code, pyautoattack) or 'torchattacks'",)
        + ("got 'pyautoattack'",),
    ),
    "autoattack-without-pyautoattack": Case(
        lambda run: _without("pyautoattack", lambda: RobustEvaluation(test_attacks="autoattack", epsilon=0.1)),
        ModuleNotFoundError,
        ("AutoAttackSpec(implementation='official') runs on pyautoattack, which is not installed",)
        + ('pip install "freeadv_pl[autoattack]"', 'pip install "pyautoattack>=0.2,<0.3"')
        + ("AutoAttackSpec(implementation='torchattacks')",),
    ),
    "autoattack-without-torchattacks": Case(
        lambda run: _without(
            "torchattacks",
            lambda: AutoAttackSpec(implementation="torchattacks")(tiny_cnn(10), *tiny_dataset(4, 10).tensors, 0.1),
        ),
        ModuleNotFoundError,
        ("AutoAttackSpec(implementation='torchattacks') runs on torchattacks, which is not installed",)
        + ('pip install "torchattacks>=3.5.1,<3.6"', "AutoAttackSpec(implementation='official')"),
    ),
    "yaml-unknown-key": Case(_unknown_yaml_key, SystemExit, ("Option 'replay' is not accepted",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case, tmp_path, monkeypatch, capsys):
    run = Run(inputs=tmp_path / "inputs", out=tmp_path / "run")
    run.inputs.mkdir()
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands beside the run, and is seen
    with pytest.raises(case.error) as raised:
        case.action(run)
    message = capsys.readouterr().err if case.error is SystemExit else str(raised.value)
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    written = sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and run.inputs not in p.parents
    )
    if case.leaves == NOTHING:
        assert not written, f"a failed run left {written}"
    else:
        assert not [name for name in written if name.endswith(".ckpt")], f"a failed run left a checkpoint: {written}"
