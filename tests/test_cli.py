"""The command line: every config parses and runs its quick variant on files of the real format, and
misconfigurations are explained."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import quiet_trainer, tiny_cnn, tiny_dataset
from dataset_files import imagenet_classes, write_cifar, write_fashion_mnist, write_image_folder
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from freeadv_pl import NaturalModule, RobustEvaluation
from freeadv_pl.cli import SUBCOMMANDS, build_cli, main
from freeadv_pl.threat_models import threat_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Entry points: every YAML but the shared pieces in common/ and the quick.yaml overlays.
ENTRY_POINTS = sorted(p for p in CONFIGS.rglob("*.yaml") if "common" not in p.parts and p.name != "quick.yaml")
# The training recipes of one dataset each; the fine-tuning recipes need a checkpoint (tests/test_finetune.py).
TRAINING_RECIPES = [p for p in ENTRY_POINTS if p.relative_to(CONFIGS).parts[0] != "finetune"]
FREE_FASHION_MNIST = CONFIGS / "fashion_mnist" / "free.yaml"
QUICK = ["--config", str(CONFIGS / "fashion_mnist" / "quick.yaml")]


def write_dataset(dataset: str, root: Path) -> None:
    """Tiny files in the real format where each config's data.yaml looks (``./data``, relative to the run)."""
    if dataset == "fashion_mnist":
        write_fashion_mnist(root / "data", n_train=600, n_test=100)
    elif dataset.startswith("cifar"):
        write_cifar(root / "data", num_classes=int(dataset.removeprefix("cifar")))
    else:
        write_image_folder(root / "data" / "imagenet", imagenet_classes(1000), per_class=1, size=(40, 36))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    made: dict[str, Path] = {}

    def root_for(dataset: str) -> Path:
        if dataset not in made:
            made[dataset] = tmp_path_factory.mktemp(dataset)
            write_dataset(dataset, made[dataset])
        return made[dataset]

    return root_for


def test_every_dataset_folder_has_configs_and_a_quick_overlay():
    datasets = {p.relative_to(CONFIGS).parts[0] for p in TRAINING_RECIPES}
    assert datasets == {"cifar10", "cifar100", "fashion_mnist", "imagenet"}
    for dataset in datasets:
        assert (CONFIGS / dataset / "quick.yaml").is_file()


@pytest.mark.parametrize("config", ENTRY_POINTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: freeadv_pl." in capsys.readouterr().out


@pytest.mark.parametrize("config", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_runs_its_quick_variant(config, dataset_root, tmp_path, monkeypatch):
    dataset = config.relative_to(CONFIGS).parts[0]
    monkeypatch.chdir(dataset_root(dataset))
    quick = CONFIGS / dataset / "quick.yaml"
    args = ["fit", "--config", str(config), "--config", str(quick), "--trainer.default_root_dir", str(tmp_path)]
    if dataset == "fashion_mnist":
        args += ["--data.init_args.data_dir", "data"]  # the generated files, not the Debian package's
    cli = build_cli(args)
    module, data = cli.model, cli.datamodule
    assert module.num_classes == data.num_classes
    assert module.model.mean is not None, "mean/std are linked from the data into the model"
    assert cli.trainer.global_step == 2 * getattr(module, "replays", 1)
    assert "val/acc" in cli.trainer.callback_metrics
    robust = threat_model(getattr(module, "norm", "linf")).key("pgd10" if dataset == "imagenet" else "pgd20")
    assert {"val/robust/natural", f"val/robust/{robust}"} <= set(cli.trainer.callback_metrics), (
        "every config evaluates robustness each epoch, in the model's threat model"
    )
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = type(module).load_from_checkpoint(checkpoint)  # the path alone: the backbone is rebuilt from the run's
    images = torch.rand(2, *module.input_shape)
    assert torch.allclose(loaded.eval()(images), module.eval()(images), atol=1e-6), "the trained model's logits"


def test_the_test_subcommand_prints_the_papers_table(dataset_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(dataset_root("cifar10"))
    configs = [
        "--config",
        str(CONFIGS / "cifar10" / "free_m2.yaml"),
        "--config",
        str(CONFIGS / "cifar10" / "quick.yaml"),
    ]
    build_cli(["fit", *configs, "--trainer.default_root_dir", str(tmp_path / "fit")])
    checkpoint = tmp_path / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    build_cli(["test", *configs, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path / "test")])
    printed = capsys.readouterr().out
    assert "on 20 test images" in printed  # all of the generated test split (quick.yaml: test_size 32)
    assert "| natural | PGD-20 | PGD-100 | CW-100 | 10-restart PGD-20 |" in printed
    assert "PGD-20 (CE loss, ε = 8/255, step 2/255, 10 random restarts)" in printed
    assert (tmp_path / "test" / "lightning_logs" / "version_0" / "robust_accuracy.csv").is_file()


@pytest.mark.parametrize(
    "flag, match",
    [
        pytest.param("--trainer.accumulate_grad_batches=2", "accumulate_grad_batches=2 is not supported", id="accum"),
        pytest.param("--trainer.gradient_clip_val=1.0", "gradient_clip_val=1.0 is not supported", id="clip"),
    ],
)
def test_manual_optimization_flags_are_rejected_with_the_fix(flag, match, in_tmp_path):
    with pytest.raises(ValueError, match=match + ".*Remove"):
        build_cli(["fit", "--config", str(FREE_FASHION_MNIST), flag, *QUICK])


def test_console_script_and_module_entry_points():
    for command in (["freeadv_pl", "--help"], [sys.executable, "-m", "freeadv_pl", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", "no warning"
        assert "{fit,validate,test,predict,export,evaluate,recipes}" in result.stdout


def test_help_lists_every_subcommand_in_one_line_and_warns_nothing(monkeypatch, capsys):
    # As the console script runs it: main() reads sys.argv (LightningCLI warns when given both args and sys.argv).
    monkeypatch.setattr(sys, "argv", ["freeadv_pl", "--help"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        main()
    assert exit_info.value.code in (0, None)
    assert [str(warning.message) for warning in caught] == []
    lines = capsys.readouterr().out.splitlines()
    for subcommand, description in SUBCOMMANDS.items():
        assert f"    {subcommand:<20}{description}" in lines


@pytest.mark.parametrize("subcommand", ["export", "evaluate", "recipes"])
def test_the_console_scripts_own_subcommands_are_not_run_by_build_cli(subcommand, capsys):
    with pytest.raises(SystemExit):
        build_cli([subcommand])
    assert f"{subcommand} runs from the console script (freeadv_pl {subcommand} ...)" in capsys.readouterr().err


def test_epsilon_may_be_written_as_a_fraction(capsys, in_tmp_path):
    free = str(FREE_FASHION_MNIST)
    with pytest.raises(SystemExit):
        main(["fit", "--config", free, "--model.init_args.epsilon", "8/255", "--print_config"])
    assert "epsilon: 8/255" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fraction string like '8/255', got '8/256x'"):
        main(["fit", "--config", free, "--model.init_args.epsilon", "8/256x", "--trainer.fast_dev_run", "true"])


DDP_SCRIPT = """
import sys
from freeadv_pl.cli import build_cli

cli = build_cli(sys.argv[1:])
trainer = cli.trainer
print(f"rank {trainer.global_rank} of {trainer.world_size}: batch {trainer.train_dataloader.batch_size}, "
      f"delta {tuple(cli.model.delta.shape)}, steps {trainer.global_step}", flush=True)
"""


def test_an_imagenet_config_runs_unchanged_under_two_process_ddp(dataset_root, tmp_path):
    # docs/design.md, "Tests": strategy="ddp" re-executes the script, so it runs as a subprocess (CPU, gloo).
    root = dataset_root("imagenet")
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT)
    config = CONFIGS / "imagenet" / "resnet50_free_m4_eps4.yaml"
    args = ["--config", str(config), "--config", str(CONFIGS / "imagenet" / "quick.yaml")]
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(script), "fit", *args], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "self.log('val/robust/" not in result.stderr, "RobustEvaluation's figures are sums over the processes"
    # quick.yaml's total batch of 4 is split over the 2 processes; each keeps its own δ for its 2 images.
    for rank in (0, 1):
        assert f"rank {rank} of 2: batch 2, delta (2, 3, 32, 32), steps 8" in result.stdout


def test_the_cuda_graph_overlay_keeps_the_config_and_falls_back_on_the_cpu(dataset_root, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset_root("cifar10"))
    overlay = CONFIGS / "cifar10" / "common" / "cuda_graph.yaml"
    args = ["fit", "--config", str(CONFIGS / "cifar10" / "free_m8.yaml"), "--config", str(overlay)]
    args += ["--config", str(CONFIGS / "cifar10" / "quick.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.warns(UserWarning, match="cuda_graph=True: training runs on cpu, not on a CUDA device"):
        cli = build_cli(args)
    group = cli.trainer.optimizers[0].param_groups[0]
    assert cli.model.cuda_graph and group["fused"] and group["lr"] == 0.1 and group["weight_decay"] == 2.0e-4
    assert cli.trainer.global_step == 2 * 8


class _LogsAnEpochTensor(Callback):
    """Logs an epoch-level tensor without sync_dist, the case for Lightning's advice (a control)."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.log("val/other", torch.tensor(0.5))


def test_no_sync_dist_advice_for_robust_accuracy_under_distributed(tmp_path):
    # Lightning advises sync_dist=True for every epoch-level tensor logged without it once torch.distributed is
    # initialized (whatever the world size). RobustEvaluation's figures are sums over the processes already: no advice
    # for them, and still for other keys. A one-process gloo group stands in for DDP here; the two-process run above
    # (test_an_imagenet_config_runs_unchanged_under_two_process_ddp) checks the same.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = NaturalModule(tiny_cnn(), 3)
        trainer = quiet_trainer(callbacks=[RobustEvaluation(epsilon=0.1, num_samples=8), _LogsAnEpochTensor()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.validate(module, DataLoader(tiny_dataset(8), batch_size=4), verbose=False)
    finally:
        dist.destroy_process_group()
    advice = [str(warning.message) for warning in caught if "sync_dist=True" in str(warning.message)]
    assert any("'val/other'" in message for message in advice), "Lightning's advice, for the control key"
    assert not any("val/robust/" in message for message in advice), advice
    assert {"val/robust/natural", "val/robust/pgd20"} <= set(trainer.callback_metrics)
