"""Free-m at the paper's budget ratio on real Fashion-MNIST (CPU): natural training for N epochs, Free-m recipes
for N/m epochs, 7-PGD for N epochs (the paper's reference, at 7× the cost) and for N/8 epochs, FGSM-RS for N/2
epochs, all at one ε with SmallCNN.

The paper trains Free-8 for ~205 natural epochs' worth of steps (80,000 on CIFAR-10): 25 passes over the unique
data. N = 80 gives Free-8 10 passes. Free-m recipes are written ``m=8,memory=example,step=0.5,noise=0.5,reset=4,
warmup=2`` (``step`` and ``noise`` in units of ε, ``reset`` in epochs, ``warmup`` in epochs; see
``FreeAdversarialModule``; ``loss=trades`` trains on TRADES, ``beta=`` its β, 6 by default, and such a replay costs two
passes, so the row runs N/(2m) epochs); ``--free`` replaces the default list, ``--methods`` picks rows by name.
``--norm l2`` trains and attacks every row in the L2 threat model (ε an L2 radius); ``--trades-pgd`` adds 10-PGD
TRADES (β = 6, step ε/4) for N epochs and at natural training's cost (N/12 epochs: 10 attack passes and 2 for the
step).

Every method is trained with SGD (momentum 0.9, weight decay 5e-4, batch 128) and a one-cycle learning rate
(linear warm-up over 40 % of the run's optimizer steps to the peak, then linear decay to ~0), at one peak per
method family (``--lr-natural``, ``--lr-free``, ``--lr-pgd``, ``--lr-fgsm``; the defaults are what
``accuracy_vs_time.py`` chose on validation at N = 8). Seed 0 for every run: the same initial weights and batch
order. Each trained model is scored on ``--val-eval-size`` held-out training images with PGD-10 (the number to
choose a recipe by) and on the test set with natural, PGD-20 and CW-20 accuracy (step ε/4, 1 random start), and
AutoAttack's standard version with PGD-20 beside it on ``--autoattack-size`` seeded test images (needs torchattacks;
0 skips it). The results files are rewritten after every row, so an interrupted run keeps what it finished;
``--models DIR`` keeps each trained model, and a later run loads it instead of training (to add attacks).

    python benchmarks/paper_budget.py --epochs 80 --note "..."       # hours on one core: see benchmarks/README.md
    python benchmarks/paper_budget.py --epochs 80 --device cuda      # minutes on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
import torch
from _common import RESULTS, machine, markdown_table, quiet_lightning, write_results
from accuracy_vs_time import (
    accuracy,
    autoattack_columns,
    autoattack_descriptions,
    autoattack_subset,
    cache_file,
    flagged_by,
    train,
)
from lightning.pytorch import LightningModule
from torch.utils.data import Subset

from freeadv_pl import (
    AttackSpec,
    FashionMNISTDataModule,
    FastAdversarialModule,
    FreeAdversarialModule,
    NaturalModule,
    PGDAdversarialModule,
)

DEFAULT_FREE = [
    *(f"m={m},memory=example,step=0.5,noise=1" for m in (8, 4, 2)),  # the shipped recipe
    *(f"m={m},memory=batch,step=0.5" for m in (8, 4, 2)),  # the paper's memory, at the step of benchmark 3
    "m=8,memory=batch,step=1",  # the paper's ε_step = ε
    "m=8,memory=example,step=0.5",  # per-example memory alone
]
_RECIPE_KEYS = {"m", "memory", "step", "noise", "reset", "warmup", "loss", "beta"}
MARKERS = "osD^v<>ph*PX"


def free_recipe(text: str, epsilon: float) -> tuple[str, dict[str, Any]]:
    """A row name and ``FreeAdversarialModule`` arguments from ``m=8,memory=example,step=0.5,...``."""
    fields = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(fields) - _RECIPE_KEYS
    if unknown or "m" not in fields:
        raise ValueError(f"a Free recipe needs m= and takes {sorted(_RECIPE_KEYS)}, got {text!r}")
    arguments: dict[str, Any] = {
        "replays": int(fields["m"]),
        "epsilon": epsilon,
        "step_size": float(fields.get("step", 1)) * epsilon,
        "delta_memory": fields.get("memory", "batch"),
    }
    if "noise" in fields:
        arguments["delta_start_noise"] = float(fields["noise"])
    if "reset" in fields:
        arguments["delta_reset_every"] = int(fields["reset"])
    if "warmup" in fields:
        arguments["epsilon_warmup_epochs"] = int(fields["warmup"])
    if "loss" in fields:
        arguments["loss"] = fields["loss"]
    if "beta" in fields:
        arguments["trades_beta"] = float(fields["beta"])
    extras = ", ".join(f"{key} {fields[key]}" for key in ("noise", "reset", "warmup", "loss", "beta") if key in fields)
    name = f"Free-{fields['m']} {arguments['delta_memory']}, step {fields.get('step', '1')}ε" + (
        f", {extras}" if extras else ""
    )
    return name, arguments


def methods(
    args: argparse.Namespace,
) -> dict[str, tuple[type[LightningModule], int, dict[str, Any], float]]:
    """name: (module class, epochs, module arguments, peak lr) at the budget rule's epochs for N natural epochs: the
    baselines first, then the Free recipes (the order rows run in)."""
    n, epsilon, norm = args.epochs, args.epsilon, {"norm": args.norm}
    table: dict[str, tuple[type[LightningModule], int, dict[str, Any], float]] = {
        "natural": (NaturalModule, n, {}, args.lr_natural)
    }
    pgd = {"steps": 7, "epsilon": epsilon, "step_size": epsilon / 4, **norm}
    fgsm = {"epsilon": epsilon, "step_size": 1.25 * epsilon, **norm}
    table["FGSM-RS"] = (FastAdversarialModule, n // 2, fgsm, args.lr_fgsm)
    table["PGD-7, natural's cost"] = (PGDAdversarialModule, n // 8, pgd, args.lr_pgd)
    table["PGD-7"] = (PGDAdversarialModule, n, pgd, args.lr_pgd)
    if args.trades_pgd:
        trades = {"steps": 10, "epsilon": epsilon, "step_size": epsilon / 4, "loss": "trades", **norm}
        table["PGD-10 TRADES, natural's cost"] = (PGDAdversarialModule, max(1, n // 12), trades, args.lr_pgd)
        table["PGD-10 TRADES"] = (PGDAdversarialModule, n, trades, args.lr_pgd)
    for text in args.free or DEFAULT_FREE:
        name, arguments = free_recipe(text, epsilon)
        arguments.update(norm)
        passes = arguments["replays"] * (2 if arguments.get("loss") == "trades" else 1)
        table[name] = (FreeAdversarialModule, n // passes, arguments, args.lr_free)
    return table


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=80, help="N, natural training's epochs (a multiple of 8)")
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf", help="the threat model of every row")
    parser.add_argument("--trades-pgd", action="store_true", help="add the 10-PGD TRADES rows")
    parser.add_argument("--train-size", type=int, default=20000, help="training images")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--val-eval-size", type=int, default=1000, help="validation images scored with PGD-10")
    parser.add_argument("--test-size", type=int, default=None, help="a seeded subset of the test set (default: all)")
    parser.add_argument("--free", action="append", default=None, help="a Free recipe (repeat; replaces the default)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only these rows, by name ('Free': every Free recipe)"
    )
    parser.add_argument("--lr-natural", type=float, default=0.05)
    parser.add_argument("--lr-free", type=float, default=0.02)
    parser.add_argument("--lr-pgd", type=float, default=0.1)
    parser.add_argument("--lr-fgsm", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (steady timings on a shared machine)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train and attack")
    parser.add_argument("--note", default=None, help="a note on the machine for the results file")
    parser.add_argument("--out", default=None, help="results path without suffix (.json, .md, .png)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="merge these results .json into --out")
    parser.add_argument(
        "--models", type=Path, default=None, help="keep each trained model here; one already there is loaded"
    )
    parser.add_argument(
        "--autoattack-size", type=int, default=1000, help="test images for AutoAttack (standard version); 0: none"
    )
    parser.add_argument(
        "--autoattack-implementation",
        choices=("official", "torchattacks"),
        default="official",
        help="AutoAttack's code: the official (pyautoattack) or torchattacks' port",
    )
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            parser.error("--merge needs --out")
        return merge(args.merge, Path(args.out))
    if args.epochs < 8 or args.epochs % 8:
        parser.error(
            f"--epochs must be a multiple of 8 (Free-8 and PGD-7 at natural's cost run N/8), got {args.epochs}"
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    epsilon, norm = args.epsilon, args.norm
    validation_attack = AttackSpec(steps=10, step_size=epsilon / 4, norm=norm)
    test_attacks = {
        "natural": AttackSpec(steps=0),
        "PGD-20": AttackSpec(steps=20, step_size=epsilon / 4, norm=norm),
        "CW-20": AttackSpec(steps=20, loss="cw", step_size=epsilon / 4, norm=norm),
    }

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {message}", flush=True)

    data = FashionMNISTDataModule(
        batch_size=128,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        seed=args.seed,
        return_index=True,  # every module takes (x, y, index); Free's "example" memory needs it
    )
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    validation = Subset(data.val_set, range(min(args.val_eval_size, len(data.val_set))))
    aa_subset = autoattack_subset(data.test_set, args.autoattack_size, args.seed) if args.autoattack_size else None
    suffix = "" if norm == "linf" else f"_{norm}"
    out = (
        Path(args.out) if args.out else RESULTS / f"paper_budget_{args.device}{suffix}_eps{epsilon:g}".replace(".", "_")
    )
    info = machine(args.device, args)
    info.update(
        epsilon=epsilon,
        norm=norm,
        attacks={key: attack.describe(epsilon) for key, attack in test_attacks.items()}
        | (
            autoattack_descriptions(aa_subset, epsilon, norm, args.autoattack_implementation)
            if aa_subset is not None
            else {}
        ),
        validation_attack=f"{validation_attack.describe(epsilon)} on {len(validation)} held-out training images",
        test_images=len(data.test_set),
        training_images=len(data.train_set),
        schedule="SGD momentum 0.9, weight decay 5e-4, batch 128; one-cycle lr, linear up over 40 % of the steps",
        times="wall and process CPU time (all threads) of trainer.fit; train_minutes: TrainingTime's training time",
    )
    if args.note:
        info["note"] = args.note
    rows: list[dict[str, Any]] = []
    for name, (module_class, epochs, arguments, lr) in methods(args).items():
        if (
            args.methods
            and name not in args.methods
            and not (module_class is FreeAdversarialModule and "Free" in args.methods)
        ):
            continue
        log(f"{name}: {epochs} epochs, peak lr {lr:g}: started")
        # A row's model depends on the norm it trained in (natural's does not, but is kept apart too).
        cache = cache_file(args.models, name if norm == "linf" else f"{name} {norm}", epochs, lr)
        module, run = train(module_class, epochs, arguments, lr, data, args.seed, cache, args.device)
        row: dict[str, Any] = {"method": name, "epochs": epochs, "arguments": arguments, **run}
        if not run["diverged"]:
            row.update(accuracy(module, validation, {"validation_pgd10": validation_attack}, args.seed, epsilon))
            row.update(accuracy(module, data.test_set, test_attacks, args.seed, epsilon))
            if aa_subset is not None:
                row.update(
                    autoattack_columns(module, aa_subset, args.seed, epsilon, norm, args.autoattack_implementation)
                )
        rows.append(row)
        scores = ", ".join(f"{key} {row[key]:.2f}" for key in info["attacks"] if key in row) or "diverged"
        score = row.get("validation_pgd10", float("nan"))
        log(f"{name}: {row['cpu_minutes']:.2f} CPU min; val PGD-10 {score:.2f} %; {scores}")
        info["total_minutes"] = (time.perf_counter() - start) / 60.0
        _write(rows, info, out)
    log(f"done; results in {out}.json, .md and .png")
    return rows


def merge(parts: list[Path], out: Path) -> list[dict[str, Any]]:
    """One results file from the files of runs that shared the grid out (e.g. two processes on two cores): the rows
    of all, in the grid's order, each part's machine record kept under ``parts``."""
    loaded = [json.loads(Path(part).read_text()) for part in parts]
    names = [
        "natural",
        "Free",
        "FGSM-RS",
        "PGD-7, natural's cost",
        "PGD-7",
        "PGD-10 TRADES, natural's cost",
        "PGD-10 TRADES",
    ]
    order = {name: rank for rank, name in enumerate(names)}
    rows = sorted(
        (row for part in loaded for row in part["rows"]),
        key=lambda row: order.get("Free" if row["method"].startswith("Free") else row["method"], len(order)),
    )
    info = dict(loaded[0]["machine"])
    info["parts"] = [part["machine"] for part in loaded]
    _write(rows, info, out)
    return rows


def _write(rows: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    natural = next((row for row in rows if row["method"] == "natural"), None)
    for row in rows:
        if natural is not None:
            row["cost_vs_natural"] = row["cpu_minutes"] / natural["cpu_minutes"]
    attacks = info["attacks"]
    columns = [
        ("method", "method"),
        ("epochs", "epochs"),
        ("passes", "forward/backward passes"),
        ("cpu_minutes", "CPU min"),
        ("cost_vs_natural", "CPU time ÷ natural's"),
        ("validation_pgd10", "val PGD-10 %"),
        *((key, f"{description} %") for key, description in attacks.items()),
        ("flagged by", "AutoAttack's flags"),
        ("lr", "peak lr"),
    ]
    table = markdown_table([row | {"flagged by": flagged_by(row)} for row in rows], columns)
    arguments = info["arguments"]
    threat = "L2" if info.get("norm") == "l2" else "L∞"
    title = (
        f"Free-m at the paper's budget ratio, Fashion-MNIST, SmallCNN, {threat} ε = {info['epsilon']:g}, "
        f"N = {arguments['epochs']}"
    )
    write_results(out, title, info, rows, table)
    _plot(rows, out.with_suffix(".png"), info, attacks["PGD-20"])
    print(table, flush=True)


def _plot(rows: list[dict[str, Any]], path: Path, info: dict[str, Any], attack: str) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    for marker, row in zip(MARKERS * 3, rows, strict=False):
        if "PGD-20" in row:
            axes.scatter(
                row["cpu_minutes"], row["PGD-20"], s=60, marker=marker, label=f"{row['method']} ({row['epochs']} ep)"
            )
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes.set_xlabel(f"training CPU time (minutes of fit, {info['torch_threads']} torch thread(s), log scale)")
    axes.set_ylabel("PGD-20 accuracy on the test set (%)")
    axes.set_title(
        f"Fashion-MNIST, SmallCNN, N = {info['arguments']['epochs']} natural epochs on {info['training_images']:,} "
        f"images, {info['test_images']:,} test images\n{attack}",
        fontsize=9,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    quiet_lightning()
    main()
