"""The command line: every config parses and runs its quick variant on files of the real format, and
misconfigurations are explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataset_files import imagenet_classes, write_cifar, write_fashion_mnist, write_image_folder
from freeadv_pl.cli import build_cli, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Entry points: every YAML but the shared pieces in common/ and the quick.yaml overlays.
ENTRY_POINTS = sorted(p for p in CONFIGS.rglob("*.yaml") if "common" not in p.parts and p.name != "quick.yaml")
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
    datasets = {p.relative_to(CONFIGS).parts[0] for p in ENTRY_POINTS}
    assert datasets == {"cifar10", "cifar100", "fashion_mnist", "imagenet"}
    for dataset in datasets:
        assert (CONFIGS / dataset / "quick.yaml").is_file()


@pytest.mark.parametrize("config", ENTRY_POINTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: freeadv_pl." in capsys.readouterr().out


@pytest.mark.parametrize("config", ENTRY_POINTS, ids=lambda p: str(p.relative_to(CONFIGS)))
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
    assert {"val/robust/natural", "val/robust/pgd10" if dataset == "imagenet" else "val/robust/pgd20"} <= set(
        cli.trainer.callback_metrics
    ), "every config evaluates robustness each epoch"
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


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
        assert "fit" in result.stdout and "test" in result.stdout


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
