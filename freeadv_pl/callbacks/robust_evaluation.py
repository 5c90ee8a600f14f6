"""Robust accuracy as a first-class metric: attacks at the end of validation and test epochs, in the training's
threat model (L∞ or L2), correct under DDP."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from freeadv_pl._checks import check_int
from freeadv_pl._evaluation_checks import first_batch_warnings, masking_warnings
from freeadv_pl._suite import EXAMPLES, WORST, bind, count
from freeadv_pl.autoattack import take_autoattack_flags
from freeadv_pl.callbacks import _shared
from freeadv_pl.evaluation import SuiteAttack, attack_suite
from freeadv_pl.threat_models import ThreatModel, threat_model

_PREFIX = {"validate": "val", "test": "test"}
# Lightning's advice, under DDP, to log an epoch-level tensor with sync_dist=True, for this callback's keys only.
_SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\('(val|test)/robust/"


class RobustEvaluation(Callback):
    """Accuracy under a suite of attacks on a fixed, seeded subset, at the end of validation and test epochs, in the
    training module's threat model (its ``norm``, L∞ or L2; L∞ for a module without one) unless ``norm`` says
    otherwise.

    Logs ``val/robust/<key>`` (``test/robust/<key>`` under ``trainer.test``) for each attack, e.g.
    ``val/robust/natural`` and ``val/robust/pgd20`` (in L2: ``val/robust/pgd20_l2``: keys and titles name the norm
    outside L∞), and ``val/robust/worst``, the per-example worst case over the suite; each is usable as
    ``monitor`` in ``ModelCheckpoint`` or ``EarlyStopping``. The numbers are those of
    :func:`~freeadv_pl.evaluation.robust_accuracy` on the subset's batches (batch ``b``'s random starts seeded with
    ``seed + b``); under DDP each process takes every world_size-th batch and the counts are summed, so every process
    logs the one-process figure. It works inside ``fit`` and under ``trainer.validate``/``trainer.test``; the sanity
    check is skipped. After ``trainer.test`` the results are printed as a table in the paper's layout and written to
    ``robust_accuracy.json`` and ``.csv`` in the logger's folder.

    Warnings: on the first batch, outputs that look like probabilities and inputs with zero gradient; after a suite
    with PGD-20 and AutoAttack of the same norm and ε, AutoAttack more than 5 points below PGD-20 (the sign of
    masked gradients); and the official AutoAttack's own checks, each as it is raised (``AutoAttackWarning``). Those
    flags are also kept in ``results[stage]["flags"]``, printed under the test table and written to
    ``robust_accuracy.json`` (``autoattack_flags``).

    Args:
        attacks: the validation suite: a list of :class:`~freeadv_pl.AttackSpec`/:class:`~freeadv_pl.AutoAttackSpec`
            (or attacks of your own: :class:`~freeadv_pl.EvaluationAttack`) or the name of one of
            :data:`~freeadv_pl.evaluation.ATTACK_PRESETS`: ``"pgd20"``, ``"cifar"``, ``"imagenet"``,
            ``"autoattack"``, ``"apgd"``, ``"pgd20_l2"`` or ``"autoattack_l2"`` (the AutoAttack ones need
            ``pip install "freeadv_pl[autoattack]"``). Attacks that name no norm take the evaluation's.
        epsilon: the radius (a float or ``"8/255"``; at most 1 in L∞, any finite number ≥ 0 in L2); None takes the
            training module's ``epsilon`` (required when the module has none, e.g. ``NaturalModule``).
        num_samples: size of the validation subset (seeded; None: the whole validation set).
        every_n_epochs: run at the end of every n-th validation epoch of ``fit`` (``trainer.validate`` always runs).
        test_attacks: the suite for ``trainer.test``; None: ``attacks``.
        test_num_samples: size of the test subset; None: the whole test set.
        batch_size: batch size of the attacks; None: that of the validation/test loader.
        seed: seed of the subsets and of the random starts.
        bf16: run the attacks' forward passes under bf16 autocast. Faster on GPUs, but it weakens the gradients
            and so the attack: off by default, and not for reported numbers.
        norm: the evaluation's threat model, ``"linf"`` or ``"l2"``; None: the training module's ``norm`` (L∞
            for a module without one).

    Raises:
        ValueError: on an unknown preset or norm, an empty or duplicated suite (or an attack named ``worst`` or
            ``examples``), a size < 1, an ε outside the norm's range, or (at setup) when no ε is given and the
            module has none, or the suite's keys clash once resolved in the module's norm.
        TypeError: on an attack that is no :class:`~freeadv_pl.EvaluationAttack`.
        ModuleNotFoundError: on an AutoAttack suite without torchattacks.

    Example:
        >>> callback = RobustEvaluation(attacks="cifar", epsilon="8/255", num_samples=1000)
        >>> [attack.key for attack in callback.attacks]
        ['natural', 'pgd20', 'pgd100', 'cw100', 'pgd20x10']
        >>> [attack.key for attack in RobustEvaluation(attacks="autoattack", epsilon=0.5, norm="l2").attacks]
        ['natural', 'pgd20_l2', 'autoattack_l2']
    """

    def __init__(
        self,
        attacks: str | Sequence[SuiteAttack] = "pgd20",
        epsilon: float | str | None = None,
        num_samples: int | None = 1000,
        every_n_epochs: int = 1,
        test_attacks: str | Sequence[SuiteAttack] | None = None,
        test_num_samples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        bf16: bool = False,
        norm: str | None = None,
    ) -> None:
        self.norm, self.epsilon = _shared.init_norm_and_epsilon(norm, epsilon)
        self.attacks = attack_suite(attacks, self.norm, name="attacks")
        self.test_attacks = (
            self.attacks if test_attacks is None else attack_suite(test_attacks, self.norm, name="test_attacks")
        )
        self.num_samples = None if num_samples is None else check_int(num_samples, "num_samples", minimum=1)
        self.test_num_samples = (
            None if test_num_samples is None else check_int(test_num_samples, "test_num_samples", minimum=1)
        )
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs", minimum=1)
        self.batch_size = None if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
        self.seed = seed
        self.bf16 = bf16
        self.results: dict[str, dict[str, Any]] = {}
        self._checked = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage in ("fit", "validate", "test"):  # fail before training, not after it
            self._suite(pl_module, "test" if stage == "test" else "validate")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if _shared.validation_due(trainer, self.every_n_epochs):
            self._run(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._run(trainer, pl_module, "test")
        if trainer.is_global_zero:
            self._report(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))

    def _batches(self, trainer: Trainer, stage: str) -> tuple[list[int], DataLoader]:
        """This process's batch numbers and a loader of its batches: the seeded subset in batches, every
        world_size-th batch to each process (docs/design.md, "Distributed evaluation and metrics")."""
        loaders = _shared.first_loader(trainer, stage)
        dataset = loaders.dataset
        size = self.num_samples if stage == "validate" else self.test_num_samples
        size = len(dataset) if size is None else min(size, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        chosen = sorted(order[:size].tolist())
        batch_size = self.batch_size or loaders.batch_size or 128
        batches = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
        numbers = list(range(len(batches)))[trainer.global_rank :: trainer.world_size]
        loader = DataLoader(
            dataset,
            batch_sampler=[batches[number] for number in numbers],
            num_workers=loaders.num_workers,
            pin_memory=loaders.pin_memory,
        )
        return numbers, loader

    def _suite(self, pl_module: LightningModule, stage: str) -> tuple[ThreatModel, tuple[SuiteAttack, ...], float]:
        """The stage's threat model, its suite resolved in it (keys checked) and its ε."""
        threat = _shared.threat(self, pl_module)
        name = "attacks" if stage == "validate" else "test_attacks"
        suite = attack_suite(self.attacks if stage == "validate" else self.test_attacks, threat, name=name)
        return threat, suite, _shared.epsilon(self, pl_module, suite, threat)

    def _run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        threat, suite, epsilon = self._suite(pl_module, stage)
        if pl_module.training:
            rank_zero_warn(
                "RobustEvaluation found the model in train mode during evaluation (something switched it back); "
                "the attacks run it in eval mode."
            )
        numbers, loader = self._batches(trainer, stage)
        take_autoattack_flags(suite)  # a shared preset's flags from another evaluation
        counts = count(
            pl_module,
            loader,
            bind(suite, pl_module, epsilon),
            seed=self.seed,
            numbers=numbers,
            bf16=self.bf16,
            inspect=None if self._checked else self._sanity_checks,
        )
        keys = [*(attack.key for attack in suite), WORST]
        summed = _shared.summed(trainer, pl_module.device, [counts[key] for key in (*keys, EXAMPLES)])
        results = {}
        # The figures are sums over the processes already: sync_dist=True would all-reduce them again for nothing.
        # Lightning gives its advice to use it when it computes the epoch's metrics, after this hook has returned,
        # so the filter cannot be scoped to the log call; it matches this advice for these keys only.
        warnings.filterwarnings("ignore", message=_SYNC_DIST_ADVICE, category=PossibleUserWarning)
        for key, accuracy in zip(keys, summed[:-1] / summed[-1], strict=True):
            results[key] = float(accuracy)
            pl_module.log(f"{_PREFIX[stage]}/robust/{key}", accuracy, prog_bar=key not in ("natural", WORST))
        self.results[stage] = results | {EXAMPLES: int(summed[-1]), "epsilon": epsilon, "norm": threat.norm}
        self.results[stage]["flags"] = take_autoattack_flags(suite)  # this process's: each warned as it was raised
        self._check_masking(suite, results, epsilon)

    def _check_masking(self, suite: Sequence[SuiteAttack], results: dict[str, float], epsilon: float = 0.0) -> None:
        for message in masking_warnings(suite, results, epsilon):
            rank_zero_warn(message)

    def _sanity_checks(self, model: LightningModule, x: Tensor, y: Tensor) -> None:
        self._checked = True
        for message in first_batch_warnings(model, x, y):
            rank_zero_warn(message)

    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self.results["test"]
        epsilon, threat = result["epsilon"], threat_model(result["norm"])
        classes = getattr(pl_module, "num_classes", 10)
        suite = attack_suite(self.test_attacks, threat, name="test_attacks")
        columns = [(attack.title, attack.key, attack.describe(epsilon, classes)) for attack in suite]
        worst = "per example, the worst of the columns: correct only if correct under every one"
        rows = [
            {"attack": title, "key": key, "accuracy": result[key], "description": description}
            for title, key, description in [*columns, ("worst case", WORST, worst)]
        ]
        header = "| " + " | ".join(row["attack"] for row in rows) + " |"
        lines = [
            threat.title(f"Accuracy (%) of {type(pl_module).__name__} on {result['examples']:,} test images") + ":",
            header,
            "|" + "---|" * len(rows),
            "| " + " | ".join(f"{100 * row['accuracy']:.2f}" for row in rows) + " |",
            *(f"  {row['attack']}: {row['description']}" for row in rows),
            *(f"  AutoAttack flag ({flag['stage']}): {flag['message']}" for flag in result["flags"]),
        ]
        print("\n".join(lines), flush=True)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        summary = {"examples": result["examples"], "norm": threat.norm, "epsilon": epsilon, "attacks": rows}
        summary["autoattack_flags"] = result["flags"]
        (folder / "robust_accuracy.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(folder / "robust_accuracy.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["attack", "key", "accuracy", "description"])
            writer.writeheader()
            writer.writerows(rows)
