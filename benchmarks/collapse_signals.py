"""Do the attack-free signals warn of Free-m's catastrophic overfitting? Train seeded Free-4 runs on real
Fashion-MNIST that collapse and runs that do not, and record per epoch what the module logs for free (the attack gain,
the gradient alignment) beside what the PGD guard measures with an attack.

    python benchmarks/collapse_signals.py                          # both runs at seeds 0, 1, 2 (about 6 CPU minutes)
    python benchmarks/collapse_signals.py --runs collapse --seeds 0 --epochs 2 --train-size 512   # a smoke run

The runs (SmallCNN, ε = 0.1, batch 128, SGD momentum 0.9, weight decay 5e-4):

- ``collapse``: Free-4 with per-example δ memory, no restart, ε_step = ε, lr 0.05 from the first step (the run of
  the real-data guard test, which collapses);
- ``recipe``: the shipped recipe (per-example δ with a random restart, ε_step = ε/2, one cycle peaking at 0.05).

Each epoch: ``train/attack_gain`` (each batch's last-replay loss over its first's), ``train/grad_alignment``, and
the PGD-5 accuracy (step ε/4) of the PGD guard on its fixed training batch (a guard that never fires). The results
give, per run, the first epoch at which the gain falls below ``--gain-threshold`` and the epoch at which the PGD
guard would fire (a drop of more than 20 points below its best), so that the two can be compared.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from lightning.pytorch import Callback, Trainer, seed_everything

from freeadv_pl import CatastrophicOverfittingGuard, FashionMNISTDataModule, FreeAdversarialModule, SmallCNN

EPSILON = 0.1
RUNS = ("collapse", "recipe")
PGD_DROP = 0.2  # the PGD guard's default threshold


class _Signals(Callback):
    """Each epoch's attack gain and alignment (read before the module logs and resets them)."""

    def __init__(self) -> None:
        self.gain: list[float | None] = []
        self.alignment: list[float | None] = []

    def on_train_epoch_end(self, trainer: Trainer, module: FreeAdversarialModule) -> None:
        self.gain.append(module.attack_gain())
        self.alignment.append(module.grad_alignment())


def make_module(run: str, steps: int) -> FreeAdversarialModule:
    """The Free-4 module of ``run`` (``"collapse"`` or ``"recipe"``); ``steps``: the run's optimizer steps."""

    def sgd(params: Any) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    if run == "collapse":
        return FreeAdversarialModule(SmallCNN(), replays=4, epsilon=EPSILON, delta_memory="example", optimizer=sgd)

    def one_cycle(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, 0.05, total_steps=steps, pct_start=0.4, anneal_strategy="linear", cycle_momentum=False
        )

    return FreeAdversarialModule(
        SmallCNN(), replays=4, epsilon=EPSILON, step_size=EPSILON / 2, delta_memory="example", delta_start_noise=1.0,
        optimizer=sgd, lr_scheduler=one_cycle,
    )


def first_below(values: list[float | None], threshold: float) -> int | None:
    """The first epoch whose value is below ``threshold`` (None: never)."""
    return next((epoch for epoch, value in enumerate(values) if value is not None and value < threshold), None)


def pgd_guard_epoch(history: list[float], drop: float = PGD_DROP) -> int | None:
    """The epoch at which a PGD guard with this ``drop`` fires on ``history`` (None: never)."""
    best = None
    for epoch, accuracy in enumerate(history):
        best = accuracy if best is None else max(best, accuracy)
        if best - accuracy > drop:
            return epoch
    return None


def run_one(run: str, seed: int, epochs: int, train_size: int, gain_threshold: float) -> dict[str, Any]:
    seed_everything(seed, verbose=False)
    data = FashionMNISTDataModule(batch_size=128, train_size=train_size, val_size=1000, seed=seed, return_index=True)
    steps = epochs * -(-train_size // 128) * 4
    module = make_module(run, steps)
    signals = _Signals()
    watch = CatastrophicOverfittingGuard(epsilon=EPSILON, threshold=1.0)  # a drop of more than 100 %: never fires
    trainer = Trainer(
        max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[signals, watch],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {
        "run": run,
        "seed": seed,
        "attack_gain": signals.gain,
        "grad_alignment": signals.alignment,
        "pgd5": watch.history,
        "gain_fires": first_below(signals.gain, gain_threshold),
        "pgd_guard_fires": pgd_guard_epoch(watch.history),
        "seconds": time.perf_counter() - start,
    }


def _row_text(row: dict[str, Any]) -> dict[str, Any]:
    def listed(values: list[float | None], percent: bool = False) -> str:
        return ", ".join("-" if v is None else (f"{100 * v:.1f}" if percent else f"{v:.3f}") for v in values)

    never = "never"
    return {
        "run": row["run"],
        "seed": row["seed"],
        "gain": listed(row["attack_gain"]),
        "alignment": listed(row["grad_alignment"]),
        "pgd5": listed(row["pgd5"], percent=True),
        "gain_fires": never if row["gain_fires"] is None else row["gain_fires"],
        "pgd_fires": never if row["pgd_guard_fires"] is None else row["pgd_guard_fires"],
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--gain-threshold", type=float, default=1.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: timings comparable across runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "collapse_signals_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        for seed in args.seeds:
            rows.append(run_one(run, seed, args.epochs, args.train_size, args.gain_threshold))
            logging.getLogger(__name__).info("%s seed %d: %s", run, seed, _row_text(rows[-1]))
    table = markdown_table(
        [_row_text(row) for row in rows],
        [
            ("run", "run"),
            ("seed", "seed"),
            ("gain", "train/attack_gain per epoch"),
            ("alignment", "train/grad_alignment per epoch"),
            ("pgd5", "PGD-5 % on the guard's batch"),
            ("gain_fires", f"gain < {args.gain_threshold:g} first at epoch"),
            ("pgd_fires", f"PGD guard (drop > {PGD_DROP:.0%}) fires at epoch"),
        ],
    )
    info = machine("cpu", args)
    write_results(args.out, "Attack-free collapse signals of Free-4 on Fashion-MNIST", info, rows, table)
    print(table)
    return rows


if __name__ == "__main__":
    quiet_lightning()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
