"""The recipes: the configs ship with the package, ``--config`` finds them by name from any folder (a user's file of
the same name wins), ``freeadv_pl recipes`` lists each with its description, and setup.cfg installs them all."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from freeadv_pl.cli import main
from freeadv_pl.recipes import find_recipe, recipes_dir, resolve_config, resolve_config_args, shipped_recipes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# Every YAML but the shared pieces in common/ is a recipe.
RECIPE_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if "common" not in p.relative_to(CONFIGS).parts)


def test_a_checkout_reads_its_top_level_configs_folder():
    assert recipes_dir() == CONFIGS


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(["--config", "fashion_mnist/free.yaml"], id="name"),
        pytest.param(["--config", "configs/fashion_mnist/free.yaml"], id="checkout-path"),
        pytest.param(["-c", "fashion_mnist/free"], id="short-flag-no-suffix"),
        pytest.param(["--config=fashion_mnist/free.yaml"], id="equals"),
    ],
)
def test_a_shipped_recipe_runs_by_name_from_another_folder(config, in_tmp_path, capsys):
    # With its overlay, given the other way; the recipe's relative includes (common/backbone.yaml) resolve beside it.
    args = ["fit", *config, "--config=configs/fashion_mnist/quick.yaml", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: freeadv_pl.FreeAdversarialModule" in printed
    assert "class_path: freeadv_pl.SmallCNN" in printed, "common/backbone.yaml, included by the recipe"
    assert "train_size: 512" in printed, "quick.yaml, the overlay"


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_every_subcommand_finds_the_recipes(subcommand, in_tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([subcommand, "--config", "fashion_mnist/natural.yaml", "--print_config"])
    assert "class_path: freeadv_pl.NaturalModule" in capsys.readouterr().out


def test_a_users_file_of_the_same_name_wins(in_tmp_path, capsys):
    (in_tmp_path / "fashion_mnist").mkdir()
    (in_tmp_path / "fashion_mnist" / "quick.yaml").write_text("trainer:\n  max_epochs: 7\n")
    assert resolve_config("fashion_mnist/quick.yaml") == "fashion_mnist/quick.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "-c", "fashion_mnist/free.yaml", "-c", "fashion_mnist/quick.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert "max_epochs: 7" in printed and "train_size: 512" not in printed


def test_yaml_text_and_other_values_pass_unchanged():
    args = ["fit", "--config", "{trainer: {max_epochs: 1}}", "--trainer.max_epochs", "2", "--config"]
    assert resolve_config_args(args) == args


def test_a_config_that_is_neither_a_file_nor_a_recipe_is_explained(in_tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"no such file in .*Did you mean fashion_mnist/free.yaml\?.*"):
        resolve_config("fashion_mnist/fre.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "nowhere.yaml"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--config nowhere.yaml: no such file" in error and "`freeadv_pl recipes` lists the shipped recipes" in error


def test_every_recipe_has_a_description_comment():
    recipes = shipped_recipes()
    assert [recipe.path for recipe in recipes] == RECIPE_FILES
    for recipe in recipes:
        assert recipe.description.endswith(".") and len(recipe.description) > 20, recipe.name
        assert find_recipe(recipe.name) == recipe.path
    overlays = {recipe.name for recipe in recipes if recipe.overlay}
    assert overlays == {f"{dataset}/quick.yaml" for dataset in ("cifar10", "cifar100", "fashion_mnist", "imagenet")}


def test_the_recipes_subcommand_lists_every_recipe_with_its_description(capsys):
    main(["recipes"])
    printed = " ".join(capsys.readouterr().out.split())  # unwrapped
    for recipe in shipped_recipes():
        dataset, name = recipe.name.split("/")
        assert f"{dataset}/ " in printed and f" {name} " in printed
        assert " ".join(recipe.description.split()) in printed
    assert "[overlay: give it after a recipe] Smoke-test overlay" in printed


def test_the_recipes_subcommand_filters_and_prints_paths(capsys):
    main(["recipes", "fashion_mnist"])
    printed = capsys.readouterr().out
    assert "free.yaml" in printed and "cifar10" not in printed
    main(["recipes", "--path", "fashion_mnist/free.yaml"])
    assert capsys.readouterr().out.strip() == str(CONFIGS / "fashion_mnist" / "free.yaml")
    main(["recipes", "--path", "fashion_mnist"])
    assert capsys.readouterr().out.strip() == str(CONFIGS / "fashion_mnist")
    with pytest.raises(SystemExit):
        main(["recipes", "mnist"])
    assert "no dataset or recipe 'mnist': the datasets are cifar10, cifar100" in capsys.readouterr().err


def test_setup_cfg_installs_every_package_and_the_recipes():
    # setup.cfg lists its packages (find: cannot map configs/ to freeadv_pl/configs): a new subpackage must be added.
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = setup["options"]["packages"].split()
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "freeadv_pl").rglob("__init__.py"))
    assert sorted(listed) == sorted([*found, "freeadv_pl.configs"])
    assert setup["options"]["package_dir"].split() == ["freeadv_pl.configs", "=", "configs"]
    assert setup["options.package_data"]["freeadv_pl.configs"].strip() == "**/*.yaml"
