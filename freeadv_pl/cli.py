"""The command line: ``freeadv_pl fit|validate|test|predict --config fashion_mnist/free.yaml`` (a LightningCLI), plus
``freeadv_pl export``, ``freeadv_pl evaluate`` and ``freeadv_pl recipes``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from freeadv_pl._lightning_compat import cli_class_path, cli_subcommand_entries
from freeadv_pl.data.base import VisionDataModule
from freeadv_pl.evaluate_command import evaluate_command
from freeadv_pl.export import exported_files
from freeadv_pl.model_sources import module_from_fit_checkpoint
from freeadv_pl.modules._checkpoint import imported_class, record_build_config
from freeadv_pl.modules.base import ClassifierModule
from freeadv_pl.modules.manual_optimization import check_trainer_for_manual_optimization
from freeadv_pl.recipes import main as recipes_main
from freeadv_pl.recipes import resolve_config_args

# One line per subcommand for ``freeadv_pl --help`` (Lightning's would be the first line of each Trainer method's
# docstring, cut mid-sentence for test and predict). export, evaluate and recipes are run by main(), not by
# LightningCLI.
SUBCOMMANDS = {
    "fit": "Train a model, e.g. --config fashion_mnist/free.yaml",
    "validate": "Evaluate a checkpoint on the validation set",
    "test": "Evaluate a checkpoint on the test set, print a table",
    "predict": "Run a checkpoint's model on prediction data",
    "export": "Export a checkpoint to run without freeadv_pl",
    "evaluate": "Evaluate any model's robustness: a table and a report",
    "recipes": "List the shipped configs that --config accepts",
}
_MAIN_ONLY = ("export", "evaluate", "recipes")
_DESCRIPTION = (
    '"Adversarial Training for Free!" (Shafahi et al., NeurIPS 2019) and its baselines as Lightning modules. Start '
    "with `freeadv_pl recipes`, then e.g. `freeadv_pl fit --config fashion_mnist/free.yaml`."
)


class FreeAdvCLI(LightningCLI):
    """LightningCLI over every :class:`ClassifierModule` and :class:`VisionDataModule`.

    The data's ``num_classes``, ``mean`` and ``std`` are linked into the model, so each is given once (by the
    DataModule). Before ``fit``, Trainer settings that manual optimization cannot honour are rejected with the fix.
    ``fit --ckpt_path last`` resumes the newest ``last*.ckpt`` under ``trainer.default_root_dir`` (the working folder
    by default), in whichever logger version folder it is, and starts anew where there is none: one command both
    starts and resumes a preemptible job.

    The configuration of the model's backbone, optimizer and LR scheduler is recorded in its hyperparameters (the
    backbone's ``weights`` excepted: the checkpoint holds them), so that ``FreeAdversarialModule.load_from_checkpoint
    (path)`` rebuilds a checkpoint of ``fit`` from the path alone.

    LightningCLI rebuilds the model from the hyperparameters of ``--ckpt_path``, class included, over the config's:
    a checkpoint of another module class (a ``NaturalModule`` checkpoint with a Free-m config) would silently train
    or test that class, and one written outside the CLI cannot be rebuilt. Both are rejected, with the fix, before
    anything runs. This check reads the checkpoint with ``torch.load(..., weights_only=True)``; Lightning's own
    loading uses PyTorch's default, ``weights_only=True`` since torch 2.6 (``--weights_only true`` forces it before).

    Every ``--config`` (``-c``) that names no file but a shipped recipe, ``fashion_mnist/free.yaml`` or
    ``configs/fashion_mnist/free.yaml``, reads that recipe (:func:`freeadv_pl.recipes.resolve_config`); one that is
    neither exits with an error that names ``freeadv_pl recipes``.

    Raises:
        ValueError: on a ``--ckpt_path`` whose module class is not the config's (or a subclass of it), or that was not
            written by the CLI; on Trainer settings that manual optimization cannot honour.
    """

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # jsonargparse keeps the action that add_subcommands() returned on the parser: reword Lightning's entries and
        # list main()'s subcommands beside them, so that --help and "expected subcommand" errors name all six.
        entries = cli_subcommand_entries(self.parser) if add_subcommands else None
        if entries is None:
            return
        subcommands, choices = entries
        for choice in choices:
            choice.help = SUBCOMMANDS.get(choice.dest, choice.help)
        for name in _MAIN_ONLY:
            subcommands.add_subcommand(name, ArgumentParser(description=SUBCOMMANDS[name]), help=SUBCOMMANDS[name])

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            try:
                resolved = resolve_config_args(sys.argv[1:] if args is None else args)
            except FileNotFoundError as error:
                parser.error(str(error))
            if args is None:
                # The console script: LightningCLI reads the command line itself. Parse its resolved form here, as
                # super() would: given it as ``args``, Lightning would warn that both args and sys.argv were given.
                self.config = parser.parse_args(resolved)
            else:
                super().parse_arguments(parser, resolved)
        subcommand = self.config.get("subcommand")
        if subcommand in _MAIN_ONLY:
            parser.error(
                f"{subcommand} runs from the console script (freeadv_pl {subcommand} ...) or main([{subcommand!r}, "
                "...]), not through build_cli or LightningCLI."
            )
        if subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            self.config.fit.ckpt_path = _newest_last_checkpoint(self.config.fit.trainer.get("default_root_dir"))
        if subcommand:
            _check_checkpoint_class(self.config[subcommand])

    def after_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if isinstance(self.model, ClassifierModule):
            record_build_config(self.model, config["model"].as_dict())

    def before_fit(self) -> None:
        check_trainer_for_manual_optimization(self.trainer)


def _check_checkpoint_class(config: Any) -> None:
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or not Path(ckpt_path).is_file():
        return
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    configured, saved = config["model"]["class_path"], cli_class_path(hparams)
    if not hparams or saved == configured:
        return
    if saved is None:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was not written by the freeadv_pl command line: its hyperparameters name no "
            "model class, so LightningCLI cannot rebuild the model from them. Resume or test it from Python, e.g. "
            "Trainer(...).fit(module, datamodule, ckpt_path=...), or pass a checkpoint of a `freeadv_pl fit` run."
        )
    saved_class, configured_class = imported_class(saved), imported_class(configured)
    builds_the_configured_class = saved_class is not None and issubclass(saved_class, configured_class or object)
    if not builds_the_configured_class:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was written by a {saved} run but the config's model is {configured}: "
            f"LightningCLI would rebuild the checkpoint's {saved.rsplit('.', 1)[-1]} over the config. Pass the config "
            "of the run that wrote it (config.yaml in its log folder), or a checkpoint of a "
            f"{configured.rsplit('.', 1)[-1]} run."
        )


def _newest_last_checkpoint(root: str | None) -> str | None:
    """``fit --ckpt_path last``: the newest ``last*.ckpt`` under the run's root, whatever the logger's version folder
    (Lightning's own "last" looks only in this run's ``ModelCheckpoint`` folder, a new version at every start)."""
    found = sorted(Path(root or ".").rglob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        rank_zero_info(
            f"--ckpt_path last: no last*.ckpt under {Path(root or '.').resolve()} yet; training starts anew."
        )
        return None
    newest = found[-1].resolve()
    rank_zero_info(f"--ckpt_path last: resuming from {newest}")
    return str(newest)


def build_cli(args: ArgsType = None, run: bool = True) -> FreeAdvCLI:
    """Parse ``args`` (``sys.argv[1:]`` when None), run the subcommand and return the CLI (``.model``, ``.trainer``,
    ``.datamodule``); with ``run=False``, ``args`` is a config without a subcommand, and nothing runs."""
    return FreeAdvCLI(
        ClassifierModule,
        VisionDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "freeadv_pl", "description": _DESCRIPTION},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """The ``freeadv_pl`` console script: LightningCLI's subcommands, ``export`` (:func:`export_command`),
    ``evaluate`` (:func:`freeadv_pl.evaluate_command.evaluate_command`) and ``recipes``
    (:func:`freeadv_pl.recipes.main`). ``args`` defaults to the command line (``sys.argv[1:]``)."""
    command = sys.argv[1:] if args is None else args
    _ignore_unactionable_warnings()
    if command and command[0] == "export":
        export_command(command[1:])
    elif command and command[0] == "evaluate":
        evaluate_command(command[1:])
    elif command and command[0] == "recipes":
        recipes_main(command[1:])
    else:
        build_cli(args)  # None: LightningCLI reads sys.argv itself


def export_command(args: list[str] | None = None) -> dict[str, Path]:
    """``freeadv_pl export --ckpt_path CKPT --output model.pt2 [--config CONFIG]``: export a checkpoint of a
    ``freeadv_pl fit`` run, rebuilt by :func:`freeadv_pl.model_sources.module_from_fit_checkpoint`: from the
    checkpoint alone, else from the run's config (``--config``; default: the ``config.yaml`` that LightningCLI wrote
    beside the ``checkpoints`` folder) and the checkpoint's weights."""
    parser = argparse.ArgumentParser(prog="freeadv_pl export", description=export_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, type=Path, help="a checkpoint written by `freeadv_pl fit`")
    parser.add_argument("--output", required=True, type=Path, help="the program's file, e.g. model.pt2")
    parser.add_argument("--config", type=Path, default=None, help="the run's config (default: its config.yaml)")
    parser.add_argument(
        "--input_shape", default=None, help="one image's shape, e.g. 3,32,32 (default: recorded in the checkpoint)"
    )
    options = parser.parse_args(args)
    if not options.ckpt_path.is_file():
        parser.error(f"--ckpt_path {options.ckpt_path} is not a file")
    exported_files(options.output)  # a bad suffix fails before the checkpoint is read
    model = module_from_fit_checkpoint(options.ckpt_path, options.config)
    shape = None if options.input_shape is None else [int(size) for size in options.input_shape.split(",")]
    files = model.export(options.output, input_shape=shape)
    for name, file in files.items():
        print(f"{name}: {file}")
    return files


def _ignore_unactionable_warnings() -> None:
    """Hide the third-party deprecation warnings that a user of the command line cannot act on: Lightning's use of
    torch's deprecated ``LeafSpec`` and torchdata's call of the deprecated ``torch.set_vital``. Each filter matches
    one message from one package; the tests, which call :func:`build_cli`, still see them."""
    warnings.filterwarnings(
        "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, module=r"lightning\."
    )
    warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning, module=r"torchdata\.")
