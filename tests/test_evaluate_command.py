"""``freeadv_pl evaluate``: on a fit checkpoint, an exported program and a user's ``module:function`` model the figures
are ``robust_accuracy``'s on the same images; the report holds what defines them; the processes of a torchrun share
the batches and sum exact counts; bad models and names are explained."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dataset_files import write_fashion_mnist
from torch.utils.data import DataLoader, Subset

from freeadv_pl import AttackSpec, FashionMNISTDataModule, NaturalModule, robust_accuracy
from freeadv_pl._evaluate_parser import evaluate_parser, inline_data_configs
from freeadv_pl._sharded_counts import count_shard, subset_batches, summed_counts
from freeadv_pl.cli import SUBCOMMANDS, build_cli, main
from freeadv_pl.evaluate_command import attack_columns, evaluate_command
from freeadv_pl.model_sources import load_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist"
EPSILON = 0.1
PGD5 = [AttackSpec(steps=0), AttackSpec(steps=5)]  # what --attacks pgd5 names: natural first
QUIET = ["--attacks", "pgd5", "--epsilon", str(EPSILON), "--progress_bar", "false", "--device", "cpu"]

# A user's module: a DataModule that is no VisionDataModule, and models by function. Images are labelled by their
# brightest band of two rows, which `linear` reads exactly: all correct clean, some broken at ε = 0.1.
BANDS = """
import torch
from lightning.pytorch import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Bands(LightningDataModule):
    num_classes = 3

    def __init__(self, size: int = 20):
        super().__init__()
        self.size = size

    def setup(self, stage):
        x = torch.rand(self.size, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        self.test_set = TensorDataset(x, x.view(self.size, 3, 12).mean(dim=2).argmax(dim=1))

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=8)


def linear(classes: int = 3):
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, classes))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        for band in range(min(classes, 3)):
            net[1].weight[band, 12 * band : 12 * band + 12] = 1 / 12
    return net


def five_classes():
    return linear(5)


def probabilities():
    return 42


def softmax():
    return nn.Sequential(linear(), nn.Softmax(dim=1))
"""


@pytest.fixture
def bands(tmp_path, monkeypatch):
    """``bands.py`` importable (``--model bands:linear``, ``--data bands.Bands``); its dataset and model."""
    (tmp_path / "bands.py").write_text(BANDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bands", raising=False)
    import bands as module

    yield module
    sys.modules.pop("bands", None)


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """A `freeadv_pl fit` run of the natural Fashion-MNIST config on generated files: its last checkpoint and data."""
    root = tmp_path_factory.mktemp("fit")
    write_fashion_mnist(root / "data", n_train=120, n_test=20)
    seeds = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    build_cli(
        ["fit", "--config", str(CONFIGS / "natural.yaml"), "--config", str(CONFIGS / "quick.yaml")]
        + ["--data.init_args.data_dir", str(root / "data"), "--data.init_args.train_size", "64"]
        + ["--data.init_args.val_size", "16", "--trainer.default_root_dir", str(root / "run")]
        + ["--trainer.enable_progress_bar", "false"]
    )
    for name, value in seeds.items():  # seed_everything's, outside any test's bookkeeping
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return root / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", root / "data"


def _fashion_mnist(data: Path) -> list[str]:
    return ["--data.class_path", "freeadv_pl.FashionMNISTDataModule", "--data.init_args.data_dir", str(data)]


def _first(dataset, count: int, batch_size: int) -> DataLoader:
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size)


def _figures(report: dict) -> dict:
    return report["accuracy"] | {"examples": report["examples"]}


def test_a_fit_checkpoint_gives_robust_accuracys_figures(fit_run, tmp_path, capsys):
    checkpoint, data = fit_run
    report = evaluate_command(
        ["--model", str(checkpoint), *_fashion_mnist(data), *QUIET]
        + ["--subset", "first", "--num_samples", "10", "--batch_size", "4", "--report", str(tmp_path / "out.json")]
    )
    module = NaturalModule.load_from_checkpoint(checkpoint).eval()
    datamodule = FashionMNISTDataModule(data)
    datamodule.setup("test")
    assert _figures(report) == robust_accuracy(module, _first(datamodule.test_set, 10, 4), PGD5, EPSILON)
    printed = capsys.readouterr().out
    assert "Accuracy (%) on 10 test images of FashionMNISTDataModule, L∞ ε = 0.1: NaturalModule" in printed
    assert "| natural | PGD-5 | worst case |" in printed
    assert (tmp_path / "out.json").is_file() and (tmp_path / "out.csv").is_file()


def test_without_load_from_checkpoint_the_runs_config_rebuilds_the_model(fit_run, monkeypatch, tmp_path):
    checkpoint, data = fit_run
    command = ["--model", str(checkpoint), *_fashion_mnist(data), *QUIET, "--num_samples", "6"]
    expected = _figures(evaluate_command(command))

    def fails(*args, **kwargs):
        raise TypeError("missing backbone")

    monkeypatch.setattr(NaturalModule, "load_from_checkpoint", fails)
    assert _figures(evaluate_command(command)) == expected, "from config.yaml beside checkpoints/"
    moved = tmp_path / "last.ckpt"
    moved.write_bytes(checkpoint.read_bytes())
    config = checkpoint.parent.parent / "config.yaml"
    assert _figures(evaluate_command([*command, "--model", str(moved), "--model_config", str(config)])) == expected
    with pytest.raises(FileNotFoundError, match="no config to rebuild the model.*missing backbone.*--model_config"):
        evaluate_command([*command, "--model", str(moved)])


def test_an_exported_program_gives_robust_accuracys_figures(fit_run, tmp_path):
    checkpoint, data = fit_run
    module = NaturalModule.load_from_checkpoint(checkpoint)
    module.export(tmp_path / "model.pt2")
    command = [*_fashion_mnist(data), *QUIET, "--subset", "first", "--num_samples", "10", "--batch_size", "4"]
    report = evaluate_command(["--model", str(tmp_path / "model.pt2"), *command])
    assert report["model_kind"] == "exported"
    assert report["model_description"] == f"NaturalModule exported to {tmp_path / 'model.pt2'}"
    program = load_model(str(tmp_path / "model.pt2")).model  # loaded anew from the file
    datamodule = FashionMNISTDataModule(data)
    datamodule.setup("test")
    assert _figures(report) == robust_accuracy(program, _first(datamodule.test_set, 10, 4), PGD5, EPSILON)
    from_checkpoint = evaluate_command(["--model", str(checkpoint), *command])
    assert report["clean_acc"] == from_checkpoint["clean_acc"], "the checkpoint's weights"


def test_a_users_function_gives_robust_accuracys_figures_and_the_report(bands, tmp_path, capsys):
    main(
        ["evaluate", "--model", "bands:linear", "--data", "bands.Bands", "--data.init_args.size", "24", *QUIET]
        + ["--epsilon", "8/255", "--norm", "l2", "--batch_size", "5", "--seed", "3", "--report", str(tmp_path / "r")]
    )
    report = json.loads((tmp_path / "r.json").read_text())
    datamodule = bands.Bands(24)
    datamodule.setup("test")
    expected = robust_accuracy(
        bands.linear(), DataLoader(datamodule.test_set, batch_size=5), PGD5, "8/255", norm="l2", seed=3
    )
    assert _figures(report) == expected
    assert report["clean_acc"] == 1 and 0 < report["accuracy"]["pgd5_l2"] < 1, "the comparison is not vacuous"
    assert report["worst_case_acc"] == expected["worst"]
    assert {key: report[key] for key in ("model", "model_kind", "data", "examples", "norm", "epsilon", "eps")} == {
        "model": "bands:linear",
        "model_kind": "function",
        "data": "bands.Bands",
        "examples": 24,
        "norm": "l2",
        "epsilon": 8 / 255,
        "eps": "8/255",
    }
    assert {key: report[key] for key in ("seed", "subset", "batch_size", "split", "threat_model")} == {
        "seed": 3,
        "subset": "seeded",
        "batch_size": 5,
        "split": "test",
        "threat_model": "L2",
    }
    assert report["model_description"] == "Sequential from bands:linear()"
    assert report["device"].startswith("cpu") and report["world_size"] == 1 and report["date"][:2] == "20"
    assert {"python", "torch", "torchvision", "lightning", "freeadv_pl", "torchattacks", "pyautoattack"} <= set(
        report["versions"]
    )
    assert [row["key"] for row in report["attacks"]] == ["natural", "pgd5_l2", "worst"]
    assert report["attacks"][1]["description"] == AttackSpec(steps=5, norm="l2").describe(8 / 255)
    assert report["attacks"][1]["correct"] == round(24 * expected["pgd5_l2"])
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["attack"], float(row["accuracy"]), row["examples"]) for row in rows] == [
        ("natural", 1.0, "24"),
        ("PGD-5 (L2)", expected["pgd5_l2"], "24"),
        ("worst case", expected["worst"], "24"),
    ]
    assert "| natural | PGD-5 (L2) | worst case |" in capsys.readouterr().out


def test_the_progress_bar_goes_to_stderr(bands, capsys):
    evaluate_command(["--model", "bands:linear", "--data", "bands.Bands", "--attacks", "natural", "--epsilon", "0.1"])
    captured = capsys.readouterr()
    assert "evaluate" in captured.err and "3/3" in captured.err
    assert "evaluate: " not in captured.out


def test_a_model_that_gives_probabilities_is_warned_in_the_table_and_the_report(bands, capsys):
    arguments = ["--model", "bands:softmax", "--data", "bands.Bands", "--attacks", "natural", "--epsilon", "0.1"]
    with pytest.warns(UserWarning, match="outputs sum to one like probabilities"):
        report = evaluate_command([*arguments, "--progress_bar", "false"])
    assert [message for message in report["warnings"] if "probabilities" in message]
    assert "  Warning: the model's outputs sum to one like probabilities" in capsys.readouterr().out


def test_the_processes_of_a_torchrun_share_the_batches_and_sum_exact_counts(bands):
    datamodule = bands.Bands(23)
    datamodule.setup("test")
    suite, batches = attack_columns("pgd5"), subset_batches(23, None, 4, seed=0)
    model = bands.linear()

    def counts(rank: int, world_size: int) -> dict[str, int]:
        return count_shard(model, datamodule.test_set, batches, suite, EPSILON, rank=rank, world_size=world_size)

    one = counts(0, 1)
    shards = [counts(rank, 2) for rank in (0, 1)]
    assert [shard["examples"] for shard in shards] == [12, 11], "batches 0, 2, 4 and 1, 3, 5: none twice"
    assert {key: shards[0][key] + shards[1][key] for key in one} == one, "each batch seeded as in one process"


def test_summed_counts_are_exact_under_a_process_group(tmp_path):
    counts = {"natural": 7, "pgd5": 3, "worst": 3, "examples": 2**40 + 1}
    assert summed_counts(counts) == counts, "without a process group"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert summed_counts(counts) == counts, "integers, not floats: 2**40 + 1 stays exact"
    finally:
        dist.destroy_process_group()


def test_attack_names_join_presets_and_single_attacks():
    keys = [attack.key for attack in attack_columns("cifar,cw20,autoattack", epsilon=8 / 255)]
    assert keys == ["natural", "pgd20", "pgd100", "cw100", "pgd20x10", "cw20", "autoattack"]
    assert [attack.key for attack in attack_columns("pgd20_l2,apgd", "l2")] == ["natural", "pgd20_l2", "apgd_l2"]
    assert attack_columns("pgd7")[1] == AttackSpec(steps=7, norm="linf")
    suite = attack_columns("autoattack,apgd", autoattack_implementation="torchattacks")
    assert [attack.implementation for attack in suite[2:]] == ["torchattacks", "torchattacks"]
    assert attack_columns("pgd20,cifar", epsilon=8 / 255)[1] == AttackSpec(steps=20, norm="linf"), "the same at 8/255"
    with pytest.warns(UserWarning, match="two columns are named 'pgd20'.*step 0.025.*step 2/255.*the first is"):
        suite = attack_columns("pgd20,cifar", epsilon=0.1)
    assert suite[1] == AttackSpec(steps=20, norm="linf")
    with pytest.raises(ValueError, match="'pgd' is neither a preset"):
        attack_columns("pgd")


def test_subsets_are_seeded_or_the_first_images():
    assert subset_batches(10, 5, 2, seed=0, first=True) == [[0, 1], [2, 3], [4]]
    seeded = subset_batches(10, 5, 2, seed=0)
    assert [index for batch in seeded for index in batch] == sorted(
        torch.randperm(10, generator=torch.Generator().manual_seed(0))[:5].tolist()
    )
    assert subset_batches(3, 100, 2, seed=0) == [[0, 1], [2]], "at most the split"


def test_data_is_given_as_in_fit(fit_run):
    checkpoint = fit_run[0]
    parser = evaluate_parser()
    model = ["--model", "x", "--epsilon", "0.1"]
    config = checkpoint.parent.parent / "config.yaml"
    for source in ("fashion_mnist/natural.yaml", "configs/fashion_mnist/common/data.yaml", str(config)):
        options = parser.parse_args(inline_data_configs([*model, "--data", source, "--data.init_args.data_dir", "d"]))
        datamodule = parser.instantiate(options).data
        assert type(datamodule) is FashionMNISTDataModule and datamodule.data_dir == Path("d"), source
    with pytest.raises(FileNotFoundError, match="--data fashion_mnist/nope.yaml: no such file.*freeadv_pl recipes"):
        inline_data_configs(["--data", "fashion_mnist/nope.yaml"])


def test_evaluate_is_a_subcommand_of_the_console_script(capsys):
    assert SUBCOMMANDS["evaluate"] == "Evaluate any model's robustness: a table and a report"
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--model MODEL" in out and "--attacks" in out and "--report" in out


def _write(path: Path, content) -> Path:
    torch.save(content, path)
    return path


@pytest.mark.parametrize(
    "model, error, match",
    [
        pytest.param("torchvision:resnet999", ValueError, "unknown model name 'resnet999'", id="unknown-torchvision"),
        pytest.param("resnet18", ValueError, "no file and no model name.*Did you mean torchvision:resnet18", id="bare"),
        pytest.param("no_such_module:net", ImportError, "no module named 'no_such_module'.*PYTHONPATH", id="module"),
        pytest.param("bands:lineer", ImportError, "has no 'lineer'. Did you mean bands:linear", id="function"),
        pytest.param("bands:probabilities", TypeError, "returned a int, not a torch.nn.Module", id="not-a-module"),
        pytest.param("bands:five_classes", ValueError, "gives 5 logits per image but Bands has num_classes=3", id="k"),
    ],
)
def test_bad_models_are_explained(bands, model, error, match):
    with pytest.raises(error, match=match):
        evaluate_command(["--model", model, "--data", "bands.Bands", *QUIET])


@pytest.mark.parametrize(
    "content, match",
    [
        pytest.param(
            {"weights": torch.zeros(2)}, "no classifier checkpoint: it holds a dict with keys weights", id="dict"
        ),
        pytest.param({"state_dict": {}, "epoch": 0}, "not of a freeadv_pl classifier", id="lightning"),
        pytest.param(b"not a checkpoint", "no checkpoint torch.load can read", id="bytes"),
    ],
)
def test_a_checkpoint_that_is_no_classifier_is_explained(bands, tmp_path, content, match):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content) if isinstance(content, bytes) else _write(path, content)
    with pytest.raises(ValueError, match=match + ".*package.module:function"):
        evaluate_command(["--model", str(path), "--data", "bands.Bands", *QUIET])


def test_a_model_that_cannot_take_the_images_is_explained(bands, fit_run):
    with pytest.raises(ValueError, match=r"cannot take Bands's test images \(batches of shape \(8, 1, 6, 6\)\)"):
        evaluate_command(["--model", str(fit_run[0]), "--data", "bands.Bands", *QUIET])


def test_bad_attacks_and_radii_are_explained_before_anything_loads():
    command = ["--model", "no_such_module:net", "--data", "freeadv_pl.FashionMNISTDataModule"]
    with pytest.raises(ValueError, match="'pgd' is neither a preset.*pgd20, cw20"):
        evaluate_command([*command, "--attacks", "pgd", "--epsilon", "0.1"])
    with pytest.raises(ValueError, match=r"epsilon must lie in \[0, 1\].*got 8"):
        evaluate_command([*command, "--attacks", "pgd20", "--epsilon", "8"])
