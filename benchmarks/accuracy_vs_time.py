"""Accuracy against training time on real Fashion-MNIST on the CPU: natural training (N epochs), Free-m for
m ∈ {2, 4, 8} (N/m epochs), 7-PGD (N epochs, and N/8 epochs: its cost matched to natural training's), FGSM-RS
(N/2 epochs), all with ε = 0.1 and SmallCNN.

Every method gets the same care: SGD (momentum 0.9, weight decay 5e-4, batch 128) with a one-cycle learning rate
(linear warm-up over 40 % of the run's optimizer steps to the peak, then linear decay to ~0, as Wong et al. schedule
FGSM-RS and Free), the peak chosen per method from ``--lr-grid`` on a held-out validation split: the highest clean
accuracy for natural training, the highest PGD-10 accuracy (CE, step ε/4, 1 random start) for the adversarial
methods; a run whose loss turns NaN/inf is out of the choice. Every run starts from the same seeded weights and
batch order. Only the chosen run of each method is evaluated on the test set: natural, PGD-20 and CW-20 accuracy
(step ε/4, 1 random start), and AutoAttack (standard version) with PGD-20 beside it on ``--autoattack-size``
seeded test images. ``--models DIR`` keeps each trained model; a later run loads it instead of training. Each fit is timed as wall time and as this process's CPU time (all its threads; less
sensitive to other work on a shared machine). Torch runs one thread by default: on a busy 2-core machine, two
threads ran natural training 10× slower (and its CPU time too) while one thread kept its pace.

    python benchmarks/accuracy_vs_time.py          # about 30 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset, Subset

from freeadv_pl import (
    AttackSpec,
    AutoAttackSpec,
    FashionMNISTDataModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    PGDAdversarialModule,
    SmallCNN,
    TrainingTime,
    robust_accuracy,
)
from freeadv_pl.autoattack import take_autoattack_flags
from freeadv_pl.evaluation import SuiteAttack

EPSILON = 0.1
VALIDATION_ATTACK = AttackSpec(steps=10, step_size=EPSILON / 4)
TEST_ATTACKS = {
    "natural": AttackSpec(steps=0),
    "PGD-20": AttackSpec(steps=20, step_size=EPSILON / 4),
    "CW-20": AttackSpec(steps=20, loss="cw", step_size=EPSILON / 4),
}
MARKERS = "osD^v<>ph*"


def methods(epochs: int) -> dict[str, tuple[type[LightningModule], int, dict[str, Any]]]:
    """name: (module class, epochs, module arguments) at the budget rule's epochs for natural training's ``epochs``.

    Free-m's δ step is ε/2, as in ``configs/fashion_mnist/free.yaml`` (ε_step = ε overfits to one-step attacks on
    this network at ε = 0.1); 7-PGD's step is 2.5 ε / 10 (Madry et al.'s rule); FGSM-RS's 1.25 ε (Wong et al.).
    """
    table: dict[str, tuple[type[LightningModule], int, dict[str, Any]]] = {"natural": (NaturalModule, epochs, {})}
    for m in (2, 4, 8):
        free = {"replays": m, "epsilon": EPSILON, "step_size": EPSILON / 2}
        table[f"Free-{m}"] = (FreeAdversarialModule, epochs // m, free)
    pgd = {"steps": 7, "epsilon": EPSILON, "step_size": EPSILON / 4}
    table["PGD-7"] = (PGDAdversarialModule, epochs, pgd)
    table["PGD-7, natural's cost"] = (PGDAdversarialModule, epochs // 8, pgd)
    table["FGSM-RS"] = (FastAdversarialModule, epochs // 2, {"epsilon": EPSILON, "step_size": 1.25 * EPSILON})
    return table


def train(
    module_class: type[LightningModule],
    epochs: int,
    arguments: dict[str, Any],
    lr: float,
    data: FashionMNISTDataModule,
    seed: int,
    cache: Path | None = None,
    device: str = "cpu",
) -> tuple[LightningModule, dict[str, Any]]:
    """One seeded run on ``device``; returns the module (on ``device``) and what the run cost (``diverged``: its
    loss turned NaN/inf).

    With ``cache``, a file holding the trained weights and the cost record: written after the run, and when it
    exists already, loaded instead of training (so a later run can add attacks to the same models).
    """
    seed_everything(seed, verbose=False)
    batches = -(-len(data.train_set) // data.batch_size)
    total_steps = epochs * batches * arguments.get("replays", 1)

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
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
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        module.model.load_state_dict(saved["model"])
        return module.to(device), saved["cost"]
    timer = TrainingTime()
    trainer = Trainer(
        accelerator=device,
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
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    try:
        trainer.fit(module, datamodule=data)
        diverged = False
    except FloatingPointError:  # the module's on_nonfinite_loss="raise": this learning rate is too high
        diverged = True
    cost = {
        "lr": lr,
        "diverged": diverged,
        "wall_minutes": (time.perf_counter() - wall_start) / 60.0,
        "cpu_minutes": (time.process_time() - cpu_start) / 60.0,
        "load_average_1min": os.getloadavg()[0],  # other processes on the machine, at the fit's end
    }
    cost.update({key: timer.summary.get(key) for key in ("optimizer_steps", "passes", "train_minutes")})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(".tmp")
        torch.save({"model": module.model.state_dict(), "cost": cost}, temporary)
        temporary.replace(cache)
    return module.to(device), cost  # the Trainer hands the model back on the CPU


def cache_file(folder: Path | None, name: str, epochs: int, lr: float) -> Path | None:
    """Where ``train`` keeps a run's model under ``--models folder`` (None: nowhere)."""
    if folder is None:
        return None
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return folder / f"{slug}_{epochs}ep_lr{lr:g}.pt"


def accuracy(
    module: LightningModule, dataset: Dataset, attacks: dict[str, SuiteAttack], seed: int, epsilon: float = EPSILON
) -> dict[str, Any]:
    """Accuracy (%) of ``module`` on ``dataset`` under each of ``attacks`` (by column) at ``epsilon``, with
    :func:`freeadv_pl.robust_accuracy`'s seeded random starts; the flags AutoAttack's own checks raised on this run,
    if any, as ``"stage: message"`` strings under ``"AutoAttack flags"``."""
    take_autoattack_flags(attacks.values())  # a spec shared between runs: drop an earlier run's flags
    result = robust_accuracy(module.model, DataLoader(dataset, batch_size=500), [*attacks.values()], epsilon, seed=seed)
    scores: dict[str, Any] = {column: 100.0 * result[attack.key] for column, attack in attacks.items()}
    flags = take_autoattack_flags(attacks.values())
    if flags:
        scores["AutoAttack flags"] = [f"{flag['stage']}: {flag['message']}" for flag in flags]
    return scores


def flagged_by(row: dict[str, Any]) -> str:
    """The attacks whose AutoAttack checks flagged ``row``'s evaluation (see :func:`accuracy`), for a table cell."""
    return ", ".join(flag.split(":")[0] for flag in row.get("AutoAttack flags", []))


def _autoattack_pair(epsilon: float, norm: str, implementation: str) -> tuple[AttackSpec, AutoAttackSpec]:
    """PGD-20 (step ε/4) and AutoAttack's standard version (run by ``implementation``) in ``norm``'s threat model."""
    autoattack = AutoAttackSpec(norm=norm, implementation=implementation)
    if norm == "linf":
        return TEST_ATTACKS["PGD-20"], autoattack
    return AttackSpec(steps=20, step_size=epsilon / 4, norm=norm), autoattack


def autoattack_subset(dataset: Dataset, size: int, seed: int) -> Subset:
    """The seeded subset of ``size`` test images that AutoAttack (and PGD-20 beside it) is run on."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[: min(size, len(dataset))].tolist()))


def autoattack_columns(
    module: LightningModule,
    subset: Subset,
    seed: int,
    epsilon: float = EPSILON,
    norm: str = "linf",
    implementation: str = "official",
) -> dict[str, float]:
    """AutoAttack's accuracy (%), PGD-20's on the same images, and the gap between them (PGD-20 − AutoAttack), in
    ``norm``'s threat model; AutoAttack run by ``implementation`` (``"official"`` or ``"torchattacks"``)."""
    pgd20, autoattack = _autoattack_pair(epsilon, norm, implementation)
    scores = accuracy(module, subset, {"PGD-20 (AA images)": pgd20, "AutoAttack": autoattack}, seed, epsilon)
    return scores | {"PGD-20 − AutoAttack": scores["PGD-20 (AA images)"] - scores["AutoAttack"]}


def autoattack_descriptions(
    subset: Subset, epsilon: float = EPSILON, norm: str = "linf", implementation: str = "official"
) -> dict[str, str]:
    """Column titles of :func:`autoattack_columns` for the results table."""
    on = f"on {len(subset):,} seeded test images"
    pgd20, autoattack = _autoattack_pair(epsilon, norm, implementation)
    return {
        "PGD-20 (AA images)": f"{pgd20.describe(epsilon)} {on}",
        "AutoAttack": f"{autoattack.describe(epsilon)}, {on}",
        "PGD-20 − AutoAttack": "PGD-20 − AutoAttack, points",
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="N, natural training's epochs (a multiple of 8)")
    parser.add_argument("--train-size", type=int, default=20000, help="training images")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--val-eval-size", type=int, default=1000, help="validation images scored for the lr choice")
    parser.add_argument("--test-size", type=int, default=None, help="a seeded subset of the test set (default: all)")
    parser.add_argument("--lr-grid", default="0.02,0.05,0.1", help="peak learning rates tried per method")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods, by name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (steady timings on a shared machine)")
    parser.add_argument("--note", default=None, help="a note on the machine for the results file")
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md, .png)")
    parser.add_argument(
        "--models", type=Path, default=None, help="keep each trained model here; one already there is loaded"
    )
    parser.add_argument(
        "--autoattack-size", type=int, default=1000, help="test images for AutoAttack (standard version); 0: none"
    )
    args = parser.parse_args(argv)
    if args.epochs < 8 or args.epochs % 8:
        parser.error(f"--epochs must be a multiple of 8 (Free-8 and 8-pass PGD-7 run N/8 epochs), got {args.epochs}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    grid = [float(value) for value in args.lr_grid.split(",")]
    data = FashionMNISTDataModule(
        batch_size=128, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size, seed=args.seed
    )
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    validation = Subset(data.val_set, range(min(args.val_eval_size, len(data.val_set))))
    aa_subset = autoattack_subset(data.test_set, args.autoattack_size, args.seed) if args.autoattack_size else None
    aa_titles = autoattack_descriptions(aa_subset) if aa_subset is not None else {}
    rows = []
    for name, (module_class, epochs, arguments) in methods(args.epochs).items():
        if args.methods and name not in args.methods:
            continue
        criterion = TEST_ATTACKS["natural"] if module_class is NaturalModule else VALIDATION_ATTACK
        runs, candidates = [], []
        for lr in grid:
            log(f"{name}: lr {lr:g}, {epochs} epochs: started")
            cache = cache_file(args.models, name, epochs, lr)
            module, run = train(module_class, epochs, arguments, lr, data, args.seed, cache)
            if run["diverged"]:
                run["validation_score"] = None
                outcome = "loss turned NaN/inf, out of the choice"
            else:
                run.update(accuracy(module, validation, {"validation_score": criterion}, args.seed))
                candidates.append((run["validation_score"], module, run))
                outcome = f"validation {criterion.title} {run['validation_score']:.1f} %"
            runs.append(run)
            minutes = f"{run['wall_minutes']:.2f} wall min, {run['cpu_minutes']:.2f} CPU min"
            log(f"{name}: lr {lr:g} finished, {minutes}, {outcome}")
        row: dict[str, Any] = {"method": name, "epochs": epochs, "grid": runs}
        rows.append(row)
        if not candidates:
            log(f"{name}: every learning rate diverged")
            continue
        _, module, chosen = max(candidates, key=lambda candidate: candidate[0])  # ties: the lower lr
        row.update({key: chosen[key] for key in ("lr", "validation_score", "optimizer_steps", "passes")})
        row.update({key: chosen[key] for key in ("wall_minutes", "cpu_minutes", "train_minutes")})
        row.update(accuracy(module, data.test_set, TEST_ATTACKS, args.seed))
        if aa_subset is not None:
            row.update(autoattack_columns(module, aa_subset, args.seed))
        log(
            f"{name}: chose lr {row['lr']:g}; test natural {row['natural']:.2f} %, PGD-20 {row['PGD-20']:.2f} %, "
            f"CW-20 {row['CW-20']:.2f} %"
        )
    info = machine("cpu", args)
    info.update(
        attacks={key: attack.describe(EPSILON) for key, attack in TEST_ATTACKS.items()} | aa_titles,
        test_images=len(data.test_set),
        training_images=len(data.train_set),
        lr_choice=(
            f"peak lr from {grid} by validation accuracy on {len(validation)} held-out training images: clean for "
            f"natural training, {VALIDATION_ATTACK.describe(EPSILON)} for the others"
        ),
        schedule="SGD momentum 0.9, weight decay 5e-4, batch 128; one-cycle lr, linear up over 40 % of the steps",
        times="wall and process CPU time (all threads) of trainer.fit; train_minutes: TrainingTime's training time",
        total_minutes=(time.perf_counter() - start) / 60.0,
    )
    if args.note:
        info["note"] = args.note
    columns = [
        ("method", "method"),
        ("epochs", "epochs"),
        ("optimizer_steps", "optimizer steps"),
        ("passes", "forward/backward passes"),
        ("wall_minutes", "wall min"),
        ("cpu_minutes", "CPU min"),
        *((key, f"{attack.describe(EPSILON)} %") for key, attack in TEST_ATTACKS.items()),
        *((key, f"{title} %") for key, title in aa_titles.items()),
        ("lr", "chosen peak lr"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    out = Path(args.out) if args.out else RESULTS / "accuracy_vs_time_cpu"
    title = f"Accuracy vs training time, Fashion-MNIST, SmallCNN, ε = {EPSILON}, {info['device']}"
    write_results(out, title, info, rows, table)
    _plot(rows, out.with_suffix(".png"), len(data.test_set))
    log(f"done; results in {out}.json, .md and .png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path, test_images: int) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for marker, row in zip(MARKERS, rows, strict=False):
        if "PGD-20" in row:
            label = f"{row['method']} ({row['epochs']} epochs)"
            axes.scatter(row["wall_minutes"], row["PGD-20"], s=60, marker=marker, label=label)
    axes.set_xlabel(f"training wall time (minutes of fit, {torch.get_num_threads()} torch thread(s))")
    axes.set_ylabel("PGD-20 accuracy on the test set (%)")
    axes.set_title(
        f"Fashion-MNIST, SmallCNN, {test_images:,} test images\n{TEST_ATTACKS['PGD-20'].describe(EPSILON)}", fontsize=10
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    quiet_lightning()
    main()
