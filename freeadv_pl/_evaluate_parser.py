"""The command line of ``freeadv_pl evaluate``: its flags, and ``--data`` given as a run's config or a shipped recipe
(whose data section is read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningDataModule

from freeadv_pl.evaluation import ATTACK_PRESETS
from freeadv_pl.recipes import find_recipe
from freeadv_pl.threat_models import Norm


def evaluate_parser() -> ArgumentParser:
    """The parser of ``freeadv_pl evaluate``'s flags (``--help`` prints them)."""
    parser = ArgumentParser(
        prog="freeadv_pl evaluate",
        description="Evaluate any model's robustness on a DataModule's test split, print a table, write a report.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a checkpoint of `freeadv_pl fit` (.ckpt), an exported program (.pt2), torchvision:NAME or timm:NAME "
        "(with --weights), or package.module:function returning an nn.Module that takes images in [0, 1]",
    )
    parser.add_argument(
        "--weights",
        type=str | None,
        default=None,
        help="torchvision/timm weights: DEFAULT, an enum name (ResNet18_Weights.IMAGENET1K_V1) or a file; none: "
        "random initialization",
    )
    parser.add_argument(
        "--model_config",
        type=str | None,
        default=None,
        help="the config.yaml of the fit run that wrote a .ckpt (default: load_from_checkpoint, else the "
        "config.yaml beside checkpoints/)",
    )
    parser.add_subclass_arguments(
        LightningDataModule,
        "data",
        as_group=False,  # in the options, not under a group titled with LightningDataModule's docstring
        required=True,
        help="the data, as in fit: --data.class_path freeadv_pl.FashionMNISTDataModule --data.init_args.data_dir "
        "DIR, a YAML of a DataModule, or a run's config.yaml or shipped recipe (its data section)",
    )
    parser.add_argument(
        "--attacks",
        default="autoattack",
        help=f"comma-separated presets ({', '.join(ATTACK_PRESETS)}) and attacks by key (pgd20, cw20, pgd20x10, "
        "apgd; _l2 for L2, e.g. pgd20_l2); natural accuracy is always the first column",
    )
    parser.add_argument(
        "--autoattack_implementation",
        type=Literal["official", "torchattacks"] | None,
        default=None,
        help="AutoAttack's code: official (Croce & Hein's, as RobustBench) or torchattacks' port (default: official)",
    )
    parser.add_argument("--epsilon", type=float | str, required=True, help="the radius, e.g. 0.1 or 8/255")
    parser.add_argument("--norm", type=Norm, default="linf", help="the threat model of the attacks that name none")
    parser.add_argument(
        "--num_samples", type=PositiveInt | None, default=None, help="evaluate this many test images (default: all)"
    )
    parser.add_argument(
        "--subset",
        type=Literal["seeded", "first"],
        default="seeded",
        help="seeded: a random subset drawn with --seed (RobustEvaluation's); first: the first --num_samples images",
    )
    parser.add_argument(
        "--batch_size", type=PositiveInt | None, default=None, help="images per batch (default: the test loader's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the attacks' random starts")
    parser.add_argument(
        "--device",
        type=str | None,
        default=None,
        help="cuda if available, else cpu; under torchrun, cuda:LOCAL_RANK",
    )
    parser.add_argument(
        "--report",
        type=str | None,
        default=None,
        help="write the report to PATH.json and PATH.csv (e.g. --report out.json)",
    )
    parser.add_argument("--progress_bar", type=bool, default=True, help="a progress bar on stderr")
    return parser


def inline_data_configs(args: list[str]) -> list[str]:
    """``--data X.yaml`` where X is a run's config or a shipped recipe: its data section, inline; a DataModule's own
    YAML (a ``class_path``) by its absolute path. Later ``--data.init_args.*`` flags still override it."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg == "--data" and index + 1 < len(resolved):
            resolved[index + 1] = _data_value(resolved[index + 1])
        elif arg.startswith("--data="):
            resolved[index] = "--data=" + _data_value(arg.removeprefix("--data="))
    return resolved


def _data_value(value: str) -> str:
    if not value.endswith((".yaml", ".yml")):
        return value
    path = Path(value) if Path(value).is_file() else find_recipe(value)
    if path is None:
        raise FileNotFoundError(
            f"--data {value}: no such file, and no shipped recipe of that name (`freeadv_pl recipes` lists them)"
        )
    settings = yaml.safe_load(path.read_text()) or {}
    if not (isinstance(settings, dict) and "data" in settings and "class_path" not in settings):
        return str(path.resolve())
    section = settings["data"]
    if isinstance(section, str):  # a recipe's include, relative to the recipe
        section = yaml.safe_load((path.parent / section).read_text())
    return json.dumps(section)
