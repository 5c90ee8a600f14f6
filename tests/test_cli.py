"""The command line: every config parses, the Fashion-MNIST configs fit, and misconfigurations are explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion_mnist
from freeadv_pl.cli import build_cli, main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Files whose names start with a lowercase method name are entry points; the others are included by them.
ENTRY_POINTS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.stem not in {"data", "backbone", "optimizer"})
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


@pytest.mark.parametrize("config", ENTRY_POINTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: freeadv_pl." in capsys.readouterr().out


@needs_fashion_mnist
@pytest.mark.parametrize("config", ENTRY_POINTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_fits_briefly(config, in_tmp_path):
    cli = build_cli(["fit", "--config", str(config), *QUICK, "--data.init_args.train_size", "512"])
    module = cli.model
    assert module.num_classes == cli.datamodule.num_classes == 10
    assert module.model.mean is not None, "mean/std are linked from the data into the model"
    assert cli.trainer.global_step == 2 * getattr(module, "replays", 1)
    assert (in_tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()


@pytest.mark.parametrize(
    "flag, match",
    [
        pytest.param("--trainer.accumulate_grad_batches=2", "accumulate_grad_batches=2 is not supported", id="accum"),
        pytest.param("--trainer.gradient_clip_val=1.0", "gradient_clip_val=1.0 is not supported", id="clip"),
    ],
)
def test_manual_optimization_flags_are_rejected_with_the_fix(flag, match, in_tmp_path):
    with pytest.raises(ValueError, match=match + ".*Remove"):
        build_cli(["fit", "--config", str(CONFIGS / "fashion_mnist" / "free.yaml"), flag, *QUICK])


def test_console_script_and_module_entry_points():
    for command in (["freeadv_pl", "--help"], [sys.executable, "-m", "freeadv_pl", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "fit" in result.stdout and "test" in result.stdout


def test_epsilon_may_be_written_as_a_fraction(capsys, in_tmp_path):
    free = str(CONFIGS / "fashion_mnist" / "free.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", free, "--model.init_args.epsilon", "8/255", "--print_config"])
    assert "epsilon: 8/255" in capsys.readouterr().out
    with pytest.raises(ValueError, match="fraction string like '8/255', got '8/256x'"):
        main(["fit", "--config", free, "--model.init_args.epsilon", "8/256x", "--trainer.fast_dev_run", "true"])
