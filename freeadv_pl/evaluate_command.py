"""``freeadv_pl evaluate``: the robust accuracy of any classifier on a DataModule's test split, printed as a table and
written as a report (JSON and CSV) that records everything the numbers depend on.

The counting is :func:`freeadv_pl.robust_accuracy`'s (the same suite code, :mod:`freeadv_pl._suite`), so the figures
are those it gives on the same batches. Under ``torchrun`` the batches are dealt out to the processes, each with the
seed it has in one process, and the exact counts are summed, as :class:`~freeadv_pl.RobustEvaluation` does.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from freeadv_pl._evaluate_parser import evaluate_parser, inline_data_configs
from freeadv_pl._evaluation_checks import first_batch_warnings, masking_warnings
from freeadv_pl._evaluation_report import build_report, device_name, report_table, write_report
from freeadv_pl._sharded_counts import (
    count_shard,
    evaluated_split,
    evaluation_device,
    join_processes,
    subset_batches,
    summed_counts,
)
from freeadv_pl._suite import EXAMPLES, checked_epsilon
from freeadv_pl.attack_spec import AttackSpec
from freeadv_pl.autoattack import AutoAttackSpec, take_autoattack_flags
from freeadv_pl.evaluation import ATTACK_PRESETS, SuiteAttack, attack_suite
from freeadv_pl.model_sources import load_model
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
    parser = evaluate_parser()
    options = parser.parse_args(inline_data_configs(sys.argv[1:] if args is None else list(args)))
    threat = threat_model(options.norm)
    suite = attack_columns(
        options.attacks, threat, check_radius(options.epsilon, "epsilon"), options.autoattack_implementation
    )
    epsilon = checked_epsilon(suite, options.epsilon, threat)  # before the data and the model load
    rank, world_size, created_group = join_processes()
    try:
        device = evaluation_device(options.device)
        datamodule = parser.instantiate(options).data
        num_classes = getattr(datamodule, "num_classes", None)
        loaded = load_model(
            options.model, weights=options.weights, num_classes=num_classes, model_config=options.model_config
        )
        model = loaded.model.to(device)
        dataset, loader = evaluated_split(datamodule, rank)
        batch_size = options.batch_size or loader.batch_size or 128
        batches = subset_batches(len(dataset), options.num_samples, batch_size, options.seed, options.subset == "first")
        take_autoattack_flags(suite)  # a shared preset's flags from an earlier evaluation
        found_first: list[str] = []  # what the first batch shows about the model (probabilities, zero gradients)
        counts = count_shard(
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
        counts = summed_counts(counts, device)
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
