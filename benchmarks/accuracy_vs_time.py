"""Accuracy against training time on real Fashion-MNIST on the CPU: natural training (N epochs), Free-m for
m ∈ {2, 4, 8} (N/m epochs), 7-PGD (N epochs, and N/8 epochs: its cost matched to natural training's), FGSM-RS
(N/2 epochs), all with ε = 0.1 and SmallCNN.

Every method gets the same care: SGD (momentum 0.9, weight decay 5e-4, batch 128) with a one-cycle learning rate
(linear warm-up over 40 % of the run's optimizer steps to the peak, then linear decay to ~0), the peak chosen per
method from ``--lr-grid`` on a held-out validation split: by clean accuracy for natural training, by PGD-10 accuracy
(step ε/4) for the adversarial methods. Only the chosen run of each method is evaluated on the test set, with
natural, PGD-20 and CW-20 accuracy (step ε/4, 1 random start). Fit time is measured as wall time and as this
process's CPU time (less sensitive to other work on a shared machine).

    python benchmarks/accuracy_vs_time.py                 # about 25 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, Subset

from freeadv_pl import (
    AttackSpec,
    FashionMNISTDataModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    PGDAdversarialModule,
    SmallCNN,
    TrainingTime,
)
from freeadv_pl.evaluation import count_correct

EPSILON = 0.1
VALIDATION_ATTACK = AttackSpec(steps=10, step_size=EPSILON / 4)
TEST_ATTACKS = {
    "natural": AttackSpec(steps=0),
    "PGD-20": AttackSpec(steps=20, step_size=EPSILON / 4),
    "CW-20": AttackSpec(steps=20, loss="cw", step_size=EPSILON / 4),
}


def methods(epochs: int) -> dict[str, tuple[type, int, dict[str, Any]]]:
    """name: (module class, epochs, module arguments) at the budget rule's epochs for natural training's ``epochs``."""
    table: dict[str, tuple[type, int, dict[str, Any]]] = {"natural": (NaturalModule, epochs, {})}
    for m in (2, 4, 8):
        table[f"Free-{m}"] = (
            FreeAdversarialModule,
            epochs // m,
            {"replays": m, "epsilon": EPSILON, "step_size": EPSILON / 2},
        )
    pgd = {"steps": 7, "epsilon": EPSILON, "step_size": EPSILON / 4}
    table["PGD-7"] = (PGDAdversarialModule, epochs, pgd)
    table["PGD-7, natural's cost"] = (PGDAdversarialModule, epochs // 8, pgd)
    table["FGSM-RS"] = (FastAdversarialModule, epochs // 2, {"epsilon": EPSILON, "step_size": 1.25 * EPSILON})
    return table


def train(module_class: type, epochs: int, arguments: dict, lr: float, data: FashionMNISTDataModule, seed: int):
    """One seeded run; returns the module, its TrainingTime summary and the fit's CPU seconds."""
    seed_everything(seed, verbose=False)
    steps_per_batch = arguments.get("replays", 1)
    batches = -(-len(data.train_set) // data.batch_size)
    total_steps = epochs * batches * steps_per_batch

    def schedule(optimizer):
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.4, anneal_strategy="linear", cycle_momentum=False
        )

    module = module_class(
        SmallCNN(),
        num_classes=10,
        mean=data.mean,
        std=data.std,
        lr_scheduler=schedule,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4),
        **arguments,
    )
    timer = TrainingTime()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    cpu_start = time.process_time()
    trainer.fit(module, datamodule=data)
    return module, timer.summary, time.process_time() - cpu_start


def accuracy(module, dataset, attack: AttackSpec, seed: int) -> float:
    loader = DataLoader(dataset, batch_size=500)
    generator = torch.Generator().manual_seed(seed)
    correct, total = count_correct(module.model, loader, lambda m, x, y: attack(m, x, y, EPSILON, generator))
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="N, natural training's epochs (a multiple of 8)")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--val-eval-size", type=int, default=1000, help="validation images scored for the lr choice")
    parser.add_argument("--test-size", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--lr-grid", default="0.05,0.1,0.2")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md, .png)")
    args = parser.parse_args(argv)
    quiet_lightning()
    grid = [float(value) for value in args.lr_grid.split(",")]
    data = FashionMNISTDataModule(batch_size=128, train_size=args.train_size, val_size=args.val_size, seed=args.seed)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    validation = Subset(data.val_set, range(min(args.val_eval_size, len(data.val_set))))
    test = data.test_set if args.test_size is None else Subset(data.test_set, range(args.test_size))
    rows = []
    for name, (module_class, epochs, arguments) in methods(args.epochs).items():
        if args.methods and name not in args.methods:
            continue
        runs = []
        for lr in grid:
            module, summary, cpu_seconds = train(module_class, epochs, arguments, lr, data, args.seed)
            criterion = AttackSpec(steps=0) if module_class is NaturalModule else VALIDATION_ATTACK
            score = accuracy(module, validation, criterion, args.seed)
            runs.append((score, lr, module, summary, cpu_seconds))
            print(
                f"{name}: lr {lr:g}, {epochs} epochs, {summary['train_minutes']:.2f} min, "
                f"validation {criterion.title} {score:.1f} %",
                flush=True,
            )
        score, lr, module, summary, cpu_seconds = max(runs, key=lambda run: run[0])
        row = {
            "method": name,
            "epochs": epochs,
            "lr": lr,
            "validation_score": score,
            "optimizer_steps": summary["optimizer_steps"],
            "passes": summary["passes"],
            "wall_minutes": summary["train_minutes"],
            "cpu_minutes": cpu_seconds / 60.0,
        }
        for key, attack in TEST_ATTACKS.items():
            row[key] = accuracy(module, test, attack, args.seed)
        rows.append(row)
        print(
            f"{name}: chose lr {lr:g}; test natural {row['natural']:.2f} %, PGD-20 {row['PGD-20']:.2f} %, "
            f"CW-20 {row['CW-20']:.2f} %",
            flush=True,
        )
    info = machine("cpu", args)
    info["attacks"] = {key: attack.describe(EPSILON) for key, attack in TEST_ATTACKS.items()}
    info["test_images"] = len(test)
    columns = [
        ("method", "method"),
        ("epochs", "epochs"),
        ("optimizer_steps", "optimizer steps"),
        ("passes", "forward/backward passes"),
        ("wall_minutes", "wall min"),
        ("cpu_minutes", "CPU min"),
        ("natural", "natural %"),
        ("PGD-20", "PGD-20 %"),
        ("CW-20", "CW-20 %"),
        ("lr", "peak lr"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    out = Path(args.out) if args.out else RESULTS / "accuracy_vs_time_cpu"
    title = f"Accuracy vs training time, Fashion-MNIST, SmallCNN, ε = {EPSILON}, {info['device']}"
    write_results(out, title, info, rows, table)
    _plot(rows, out.with_suffix(".png"), len(test))
    return rows


def _plot(rows: list[dict[str, Any]], path: Path, test_images: int) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        axes.scatter(row["wall_minutes"], row["PGD-20"], s=40)
        axes.annotate(row["method"], (row["wall_minutes"], row["PGD-20"]), textcoords="offset points", xytext=(5, 4))
    axes.set_xlabel("training wall time (minutes, 2 CPU cores)")
    axes.set_ylabel("PGD-20 accuracy (%)")
    axes.set_title(
        f"Fashion-MNIST, {test_images:,} test images: {TEST_ATTACKS['PGD-20'].describe(EPSILON)}", fontsize=9
    )
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
