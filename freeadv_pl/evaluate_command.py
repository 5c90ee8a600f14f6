"""``freeadv_pl evaluate``: the robust accuracy of any classifier on a DataModule's test split, printed as a table and
written as a report (JSON and CSV) that records everything the numbers depend on.

The counting is :func:`freeadv_pl.robust_accuracy`'s (the same suite code, :mod:`freeadv_pl._suite`), so the figures
are those it gives on the same batches. Under ``torchrun`` the batches are dealt out to the processes, each with the
seed it has in one process, and the exact counts are summed, as :class:`~freeadv_pl.RobustEvaluation` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from freeadv_pl._evaluation_checks import first_batch_warnings, masking_warnings
from freeadv_pl._evaluation_report import build_report, device_name, report_table, write_report
from freeadv_pl._suite import EXAMPLES, bind, checked_epsilon, count
from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.autoattack import AutoAttackSpec, take_autoattack_flags
from freeadv_pl.evaluation import ATTACK_PRESETS, SuiteAttack, attack_suite
from freeadv_pl.model_sources import load_model
from freeadv_pl.recipes import find_recipe
from freeadv_pl.threat_models import ThreatModel, check_radius, threat_model

__all__ = ["attack_columns", "evaluate_command"]

# One attack by its key: pgd20, cw100, pgd20x10, with _l2 for the L2 threat model; apgd_l2.
_ATTACK_KEY = re.compile(r"^(?P<loss>pgd|cw)(?P<steps>\d+)(?:x(?P<restarts>\d+))?(?P<l2>_l2)?$")


def evaluate_command(args: Sequence[str] | None = None) -> dict[str, Any]:
    """``freeadv_pl evaluate --model SOURCE --data ... --attacks pgd20,autoattack --epsilon 8/255``: the accuracy of
    any classifier under a suite of attacks on a DataModule's test split.

    ``--model`` is a checkpoint of ``freeadv_pl fit`` (``.ckpt``), an exported program (``.pt2``),
    ``torchvision:NAME``/``timm:NAME`` with ``--weights``, or ``package.module:function`` returning an ``nn.Module``
    that takes images in [0, 1] (:func:`freeadv_pl.model_sources.load_model`). ``--data`` is given as to ``fit``: a
    DataModule class with its ``init_args``, a YAML of one, or a run's config or a shipped recipe (its data section).
    ``--attacks`` joins presets of :data:`~freeadv_pl.ATTACK_PRESETS` and single attacks by key (``pgd20``, ``cw20``,
    ``pgd20x10``, ``apgd``, ``_l2`` for L2), natural accuracy always first. Prints the table (every column and the
    per-example worst case) and, with ``--report out.json``, writes ``out.json`` and ``out.csv``.

    Args:
        args: the command line after ``evaluate``; None: ``sys.argv[1:]``.

    Returns:
        The report, as written to the JSON file (on every process under ``torchrun``).

    Raises:
        ValueError: on an unknown attack name, an ε outside the norm's range, a model whose outputs do not match the
            data's classes or images, or a source that is no classifier (see ``load_model``).
        ImportError: on a ``module:function`` that cannot be imported.
        SystemExit: on flags the parser rejects (the message names them).
    """
    parser = _parser()
    options = parser.parse_args(_inline_data_configs(sys.argv[1:] if args is None else list(args)))
    threat = threat_model(options.norm)
    suite = attack_columns(
        options.attacks, threat, check_radius(options.epsilon, "epsilon"), options.autoattack_implementation
    )
    epsilon = checked_epsilon(suite, options.epsilon, threat)  # before the data and the model load
    rank, world_size, created_group = _join_processes()
    try:
        device = _device(options.device)
        datamodule = parser.instantiate(options).data
        num_classes = getattr(datamodule, "num_classes", None)
        loaded = load_model(
            options.model, weights=options.weights, num_classes=num_classes, model_config=options.model_config
        )
        model = loaded.model.to(device)
        dataset, loader = _test_split(datamodule, rank)
        batch_size = options.batch_size or loader.batch_size or 128
        batches = _subset_batches(
            len(dataset), options.num_samples, batch_size, options.seed, options.subset == "first"
        )
        take_autoattack_flags(suite)  # a shared preset's flags from an earlier evaluation
        found_first: list[str] = []  # what the first batch shows about the model (probabilities, zero gradients)
        counts = _count_shard(
            model,
            dataset,
            batches,
            suite,
            epsilon,
            seed=options.seed,
            rank=rank,
            world_size=world_size,
            loader=loader,
            check=_output_check(options.model, type(datamodule).__name__, num_classes, found_first),
            progress=options.progress_bar and rank == 0,
        )
        counts = _summed_counts(counts, device)
        settings = {"batch_size": batch_size, "device": device_name(device), "world_size": world_size}
        settings["autoattack_flags"] = take_autoattack_flags(suite)  # this process's
        accuracy = {key: counts[key] / max(counts[EXAMPLES], 1) for key in counts}
        settings["warnings"] = found_first + masking_warnings(suite, accuracy, epsilon)
        for message in settings["warnings"] if rank == 0 else ():
            warnings.warn(message, stacklevel=2)
        report = build_report(options, loaded, datamodule, suite, threat, epsilon, counts, settings, args)
        if rank == 0:
            print(report_table(report), flush=True)
            if options.report:
                for name, file in write_report(report, options.report).items():
                    print(f"{name}: {file}", flush=True)
        return report
    finally:
        if created_group:
            dist.destroy_process_group()


def _parser() -> ArgumentParser:
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
    parser.add_argument(
        "--norm", type=Literal["linf", "l2"], default="linf", help="the threat model of the attacks that name none"
    )
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


def _inline_data_configs(args: list[str]) -> list[str]:
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


def attack_columns(
    names: str,
    norm: str | ThreatModel = "linf",
    epsilon: float | None = None,
    autoattack_implementation: str | None = None,
) -> tuple[SuiteAttack, ...]:
    """The suite that ``--attacks`` names: natural accuracy, then the columns of each comma-separated name in turn,
    resolved in ``norm`` and without repeats. A name is a preset of :data:`~freeadv_pl.ATTACK_PRESETS` or one
    attack by its key: ``natural``, ``pgdK``, ``cwK``, ``pgdKxR`` (R restarts), step ε/4; ``autoattack``, ``apgd``;
    ``_l2`` names the L2 version. Of two columns with the same key, the first is kept; a warning says so when they
    differ (at ``epsilon``, when given: ``cifar``'s PGD-20 steps 2/255, the ``autoattack`` preset's ε/4).
    ``autoattack_implementation`` (``"official"`` or ``"torchattacks"``) is that of every AutoAttack column; None
    keeps :class:`~freeadv_pl.AutoAttackSpec`'s default.

    Raises:
        ValueError: on an unknown name.

    Example:
        >>> [attack.key for attack in attack_columns("pgd20,cw20,autoattack")]
        ['natural', 'pgd20', 'cw20', 'autoattack']
        >>> [attack.key for attack in attack_columns("pgd20x10,apgd_l2", "l2")]
        ['natural', 'pgd20x10_l2', 'apgd_l2']
    """
    threat = threat_model(norm)
    columns: list[SuiteAttack] = [AttackSpec(steps=0)]
    for name in (part.strip() for part in str(names).split(",")):
        columns += _named_columns(name)
    if autoattack_implementation is not None:
        columns = [
            dataclasses.replace(attack, implementation=autoattack_implementation)
            if isinstance(attack, AutoAttackSpec)
            else attack
            for attack in columns
        ]
    suite: dict[str, SuiteAttack] = {}
    for column in (attack.resolved(threat.norm) for attack in columns):
        kept = suite.setdefault(column.key, column)
        settings = (kept, column) if epsilon is None else (kept.describe(epsilon), column.describe(epsilon))
        if settings[0] != settings[1]:
            warnings.warn(
                f"--attacks {names}: two columns are named {column.key!r}, {settings[0]} and {settings[1]}: the "
                "first is evaluated. Name the attacks one by one to choose.",
                stacklevel=2,
            )
    return attack_suite(list(suite.values()), threat, name="--attacks")


def _named_columns(name: str) -> tuple[SuiteAttack, ...]:
    if name in ATTACK_PRESETS:
        return ATTACK_PRESETS[name]
    if name == "natural":
        return ()
    norm = "l2" if name.endswith("_l2") else None
    if name.removesuffix("_l2") in ("autoattack", "apgd"):
        return (AutoAttackSpec(version="standard" if name.startswith("autoattack") else "apgd", norm=norm),)
    match = _ATTACK_KEY.match(name)
    if match is None:
        raise ValueError(
            f"--attacks: {name!r} is neither a preset ({', '.join(ATTACK_PRESETS)}) nor an attack's key (natural, "
            "pgd20, cw20, pgd20x10, autoattack, apgd; _l2 for L2, e.g. pgd20_l2). Separate names with commas, e.g. "
            "--attacks pgd20,cw20,autoattack."
        )
    steps, restarts = int(match["steps"]), int(match["restarts"] or 1)
    return (AttackSpec(steps=steps, loss="cw" if match["loss"] == "cw" else "ce", restarts=restarts, norm=norm),)


def _subset_batches(
    size: int, num_samples: int | None, batch_size: int, seed: int, first: bool = False
) -> list[list[int]]:
    """The evaluated examples of a split of ``size``, in batches: ``num_samples`` of them (all when None), a random
    subset drawn with ``seed`` (sorted; :class:`~freeadv_pl.RobustEvaluation`'s) or, with ``first``, the first ones.

    Example:
        >>> _subset_batches(10, 5, 2, seed=0, first=True)
        [[0, 1], [2, 3], [4]]
    """
    wanted = size if num_samples is None else min(num_samples, size)
    if first:
        chosen = list(range(wanted))
    else:
        chosen = sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:wanted].tolist())
    return [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]


def _count_shard(
    model: nn.Module,
    dataset: Dataset,
    batches: Sequence[Sequence[int]],
    suite: Sequence[SuiteAttack],
    epsilon: float,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    loader: DataLoader | None = None,
    check: Callable[[nn.Module, Tensor, Tensor], None] | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """This process's exact counts (correct examples per attack key, ``worst`` and ``examples``): every
    ``world_size``-th of ``batches`` from ``rank`` on, batch ``b`` seeded with ``seed + b`` as in one process, so that
    the sums over the processes are the one-process counts. ``loader`` lends its workers, pinning and collation."""
    numbers = list(range(len(batches)))[rank::world_size]
    settings = (
        {}
        if loader is None
        else {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory, "collate_fn": loader.collate_fn}
    )
    shard = DataLoader(dataset, batch_sampler=[list(batches[number]) for number in numbers], **settings)
    attacks = bind(suite, model, epsilon)
    if not progress:
        return count(model, shard, attacks, seed=seed, numbers=numbers, inspect=check)
    from tqdm.auto import tqdm

    with tqdm(total=len(numbers), desc="evaluate", unit="batch", file=sys.stderr, dynamic_ncols=True) as bar:
        return count(model, shard, _announced(attacks, bar), seed=seed, numbers=numbers, inspect=check)


def _announced(attacks: dict[str, Callable[..., Tensor]], bar: Any) -> dict[str, Callable[..., Tensor]]:
    """The attacks, naming themselves on the progress bar as they run; the last one of a batch advances it."""
    last = list(attacks)[-1]

    def announced(key: str, attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Any, **kwargs: Any) -> Tensor:
            bar.set_postfix_str(key)
            x_adv = attack(*args, **kwargs)
            if key == last:
                bar.update(1)
            return x_adv

        return run

    return {key: announced(key, attack) for key, attack in attacks.items()}


def _summed_counts(counts: dict[str, int], device: torch.device | str = "cpu") -> dict[str, int]:
    """``counts`` summed over the processes of the default ``torch.distributed`` group (exactly, as integers); the
    counts themselves when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor(list(counts.values()), dtype=torch.long, device=on)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(counts, values.tolist(), strict=True))


def _join_processes() -> tuple[int, int, bool]:
    """``(rank, world_size, created)``: under torchrun (``WORLD_SIZE`` > 1) the default process group, made here
    unless it exists."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def _device(requested: str | None) -> torch.device:
    local = os.environ.get("LOCAL_RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(local or torch.cuda.current_device()))
    return device


def _test_split(datamodule: LightningDataModule, rank: int) -> tuple[Dataset, DataLoader]:
    """The test split's dataset and loader: ``prepare_data`` on the first process only, then ``setup("test")``."""
    if rank == 0:
        datamodule.prepare_data()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    if isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{type(datamodule).__name__}.test_dataloader() gave a {type(loader).__name__}: evaluate needs a "
            "torch DataLoader over a dataset of (image, label) pairs"
        )
    return loader.dataset, loader


def _output_check(
    source: str, data: str, num_classes: int | None, found: list[str]
) -> Callable[[nn.Module, Tensor, Tensor], None]:
    """The check on the first batch: the model takes the data's images and gives one logit per class (else an
    error); what else the batch shows about the model (:func:`first_batch_warnings`) is appended to ``found``."""

    def check(model: nn.Module, x: Tensor, y: Tensor) -> None:
        try:
            with torch.no_grad():
                logits = model(x)
        except RuntimeError as error:
            raise ValueError(
                f"--model {source} cannot take {data}'s test images (batches of shape {tuple(x.shape)}): "
                f"{str(error).strip().splitlines()[0]}. Evaluate it on data of the shape it was built for."
            ) from error
        if logits.ndim != 2:
            raise ValueError(
                f"--model {source} gives outputs of shape {tuple(logits.shape)} for a batch of {len(x)} images: a "
                "classifier must give logits of shape (batch, classes)"
            )
        width = logits.shape[1]
        if num_classes is not None and width != num_classes:
            raise ValueError(
                f"--model {source} gives {width} logits per image but {data} has num_classes={num_classes}: pass "
                f"a model with {num_classes} outputs (torchvision/timm: weights for {num_classes} classes, or no "
                f"--weights to build such a head), or data with {width} classes."
            )
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < width:
            raise ValueError(
                f"{data}'s labels lie in [{int(y.min())}, {int(y.max())}] but --model {source} gives {width} logits: "
                "the labels must index the model's classes."
            )
        found.extend(first_batch_warnings(model, x, y))

    return check
