"""The command line: ``freeadv_pl fit|validate|test --config configs/...yaml`` (a LightningCLI)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from freeadv_pl.data.base import VisionDataModule
from freeadv_pl.modules.base import ClassifierModule, check_trainer_for_manual_optimization


class FreeAdvCLI(LightningCLI):
    """LightningCLI over every :class:`ClassifierModule` and :class:`VisionDataModule`.

    The data's ``num_classes``, ``mean`` and ``std`` are linked into the model, so each is given once (by the
    DataModule). Before ``fit``, Trainer settings that manual optimization cannot honour are rejected with the fix.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "mean", "std"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_fit(self) -> None:
        check_trainer_for_manual_optimization(self.trainer)


def build_cli(args: list[str] | None = None) -> FreeAdvCLI:
    """Parse ``args`` (``sys.argv[1:]`` when None), run the subcommand and return the CLI (``.model``, ``.trainer``,
    ``.datamodule``)."""
    return FreeAdvCLI(
        ClassifierModule,
        VisionDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """The ``freeadv_pl`` console script."""
    build_cli(args)
